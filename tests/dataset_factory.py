"""Small real trajectory datasets for distill tests, written in-process (no Ray) with the real
recording sampler and the real storage writer. The Ray builder is tested in test_generate.py."""

from __future__ import annotations

from pathlib import Path

from arcflow.pipeline.generate import GenerationConfig, _dataset_spec
from arcflow.pipeline.plan import plan_shards
from arcflow.pipeline.recording import record_trajectories
from arcflow.pipeline.registry import load_teacher
from arcflow.storage.writer import create_or_open_dataset


def teacher_info(teacher, steps: int) -> dict:
    cond = teacher.encode_prompts(teacher.prompt_set()[:1])
    return {
        "teacher_id": teacher.teacher_id,
        "revision": teacher.revision,
        "latent_shape": list(teacher.latent_shape),
        "shift": teacher.shift,
        "default_guidance": teacher.default_guidance,
        "sigmas": teacher.sigmas(steps).tolist(),
        "true_cfg": teacher.true_cfg,
        "prompts": teacher.prompt_set(),
        "cond_spec": {k: {"shape": list(v.shape[1:]), "dtype": "float32"} for k, v in cond.items()},
    }


def make_dataset(out: Path, num_samples: int = 48, steps: int = 4, shard_size: int = 16, seed: int = 0) -> Path:
    """A committed digits-teacher dataset at ``out`` (float32 storage)."""
    teacher = load_teacher("digits")
    config = GenerationConfig(out=str(out), num_samples=num_samples, steps=steps, shard_size=shard_size, seed=seed,
                              dtype="float32", batch_size=16)
    spec = _dataset_spec(config, teacher_info(teacher, steps), teacher.default_guidance)
    writer = create_or_open_dataset(str(out), spec)
    for plan in plan_shards(num_samples, shard_size, teacher.prompt_set(), seed):
        cond = teacher.encode_prompts(list(plan.prompts))
        x, u, sigmas = record_trajectories(teacher, cond, teacher.noise(plan.seeds), steps=steps,
                                           guidance=spec.guidance, micro_batch=16)
        writer.write_shard(plan.shard_id, x=x.numpy(), u=u.numpy(), sigmas=sigmas.double().numpy(),
                           cond={k: v.float().numpy() for k, v in cond.items()}, sample_ids=list(plan.sample_ids),
                           seeds=list(plan.seeds), prompts=list(plan.prompts), guidance=spec.guidance)
    return out
