"""Small real trajectory datasets for distill tests, written in-process (no Ray) with the builder's
own recording and commit functions. The Ray orchestration itself is tested in test_generate.py."""

from __future__ import annotations

from pathlib import Path

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
