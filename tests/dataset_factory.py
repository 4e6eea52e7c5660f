"""Small real trajectory datasets and student runs for tests, made in-process (no Ray): datasets
with the builder's own recording and commit functions, runs with the trainer's own worker loop.
The Ray orchestration itself is tested in test_generate.py and test_distill.py."""

from __future__ import annotations

import json
from pathlib import Path

from arcflow.distill.config import DistillConfig
from arcflow.distill.run_plan import DISTILL_CONFIG_FILE, plan_run
from arcflow.distill.worker import train_worker
from arcflow.pipeline.generate import dataset_spec
from arcflow.pipeline.generation_config import GenerationConfig
from arcflow.pipeline.shard_worker import commit_shard, describe_teacher, record_shard
from arcflow.pipeline.plan import plan_shards
from arcflow.pipeline.registry import load_teacher
from arcflow.storage.writer import create_or_open_dataset


def make_dataset(out: Path, num_samples: int = 48, steps: int = 4, shard_size: int = 16, seed: int = 0) -> Path:
    """A committed digits-teacher dataset at ``out`` (float32 storage)."""
    teacher = load_teacher("digits")
    config = GenerationConfig(out=str(out), num_samples=num_samples, steps=steps, shard_size=shard_size, seed=seed,
                              dtype="float32", batch_size=16)
    info = describe_teacher(teacher, None, steps)
    spec = dataset_spec(config, info, teacher.default_guidance)
    create_or_open_dataset(str(out), spec)
    for plan in plan_shards(num_samples, shard_size, info["prompts"], seed):
        commit_shard(str(out), spec, plan, record_shard(teacher, spec, plan, config.batch_size))
    return out


#: A tiny student run (a few iterations, K=2, LoRA rank 2); tests override what they exercise.
TINY_RUN = dict(iters=4, batch_size=8, lr=1e-3, warmup=1, checkpoint_every=4, log_every=1, lora_rank=2, k=2,
                progress=False)


#: A tiny on-policy run on the digits teacher: a few rollouts of a K=2, rank-2 student.
TINY_ON_POLICY = dict(TINY_RUN, batch_size=4, teacher_mix_iters=2)


def train_tiny_on_policy(out: Path, **overrides) -> DistillConfig:
    """An on-policy run (``--teacher digits`` unless ``from_run`` is given) in ``out``, trained in this
    process by the Ray Train worker's loop, with the driver's own resolution of a polish."""
    from arcflow.distill.on_policy import resolve

    settings = {"out": str(out), "on_policy": True, **TINY_ON_POLICY, **overrides}
    if "from_run" not in settings:
        settings.setdefault("teacher", "digits")
    config = resolve(DistillConfig.from_dict(settings))
    plan = plan_run(config)
    Path(out).mkdir(parents=True, exist_ok=True)
    if not (Path(out) / DISTILL_CONFIG_FILE).is_file():
        (Path(out) / DISTILL_CONFIG_FILE).write_text(json.dumps(config.to_dict()))
    train_worker(config, plan)
    return config


def train_tiny_run(dataset: Path, out: Path, **overrides) -> DistillConfig:
    """A real student run in ``out``, trained in this process by the loop each Ray Train worker runs:
    ``TINY_RUN`` with ``overrides`` (``resume=True`` continues it). Returns its config."""
    config = DistillConfig.from_dict({"dataset": str(dataset), "out": str(out), **TINY_RUN, **overrides})
    plan = plan_run(config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / DISTILL_CONFIG_FILE).is_file():  # as `arcflow distill`: a resumed run keeps its first record
        (out / DISTILL_CONFIG_FILE).write_text(json.dumps(config.to_dict()))
    train_worker(config, plan)
    return config
