"""The generation worker: ``ShardWorker`` (a Ray actor's body) holds one teacher and turns shard
plans into committed shards; ``record_shard`` and ``commit_shard`` are its two halves.

The worker runs two shard tasks at a time (a threaded actor, see pipeline/generate.py): the teacher
is guarded by a lock, so while one task writes its shard to storage the other already computes the
next one, and the teacher never waits on I/O. Shard contents are pure functions of the plan
(pipeline/plan.py), so a retried shard is identical.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Optional

import torch

from arcflow.core.errors import ArcflowError, quote
from arcflow.storage.format import DatasetSpec

from .plan import ShardPlan
from .registry import TeacherSource, teacher_name


def _pick_device(gpus: float) -> str:
    return "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"


def describe_teacher(teacher: Any, prompts: Optional[list[str]], steps: int) -> dict[str, Any]:
    """Validate ``prompts`` (None: the teacher's own) and collect what a dataset header needs."""
    prompts = prompts if prompts is not None else teacher.prompt_set()
    teacher.validate_prompts(prompts)
    cond = teacher.encode_prompts(prompts[:1])
    layout = getattr(teacher, "layout", None)
    return {
        "prompts": list(prompts),
        "teacher_id": teacher.teacher_id,
        "revision": teacher.revision,
        "latent_shape": list(teacher.latent_shape),
        "shift": float(teacher.shift),
        "default_guidance": float(teacher.default_guidance),
        "sigmas": teacher.sigmas(steps).tolist(),
        "true_cfg": bool(teacher.true_cfg),
        "cond_spec": {k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype).replace("torch.", "")} for k, v in cond.items()},
        **({"conditioning_layout": layout} if layout is not None else {}),
    }


def record_shard(teacher: Any, spec: DatasetSpec, plan: ShardPlan, batch_size: int) -> dict[str, Any]:
    """Run the teacher's recording sampler over one shard plan; returns CPU arrays to commit."""
    with torch.inference_mode():
        # One constant micro-batch size for the whole job: a sample's trajectory is then
        # bit-identical whichever shard or position it lands in (pipeline/recording.py).
        x, u, sigmas, cond = teacher.record(list(plan.prompts), list(plan.seeds), spec.steps, spec.guidance,
                                            micro_batch=batch_size)
    return {"x": x.numpy(), "u": u.numpy(), "sigmas": sigmas.double().numpy(),
            "cond": {k: v.float().cpu().numpy() for k, v in cond.items()}}


def commit_shard(url: str, spec: DatasetSpec, plan: ShardPlan, arrays: dict[str, Any]) -> None:
    """Write one recorded shard whole and commit it (storage's commit protocol)."""
    from arcflow.storage.writer import create_or_open_dataset

    create_or_open_dataset(url, spec, resume=True).write_shard(
        plan.shard_id,
        sample_ids=list(plan.sample_ids),
        seeds=list(plan.seeds),
        prompts=list(plan.prompts),
        guidance=spec.guidance,
        **arrays,
    )


class ShardWorker:
    """A Ray actor body: holds one teacher and turns shard plans into committed shards."""

    def __init__(
        self, teacher: TeacherSource, teacher_options: dict[str, Any], threads: int, gpus: float,
        driver: Optional[dict[str, Any]] = None,
    ) -> None:
        from arcflow.core.driver_watch import watch_driver
        from .registry import load_teacher

        watch_driver(driver)  # a killed driver's actors stop instead of finishing shards unseen
        torch.set_num_threads(threads)
        # The writer's libraries now, while the worker starts: importing them during the first
        # shard's write would take the GIL from the teacher for seconds.
        import pyarrow.parquet  # noqa: F401
        import zarr.api.asynchronous  # noqa: F401
        options = dict(teacher_options)
        device = options.pop("device", None) or _pick_device(gpus)  # --device overrides the default
        self._compute = threading.Lock()
        self._load_error: Optional[ArcflowError] = None
        try:
            self.teacher = load_teacher(teacher, device=device, **options)
        except ArcflowError as exc:
            # A user error while loading (missing weights, unknown hub id, bad option) raised here
            # would become an ActorDiedError (after restarts) that hides it behind a traceback.
            # Keep it and raise it from the first task: a RayTaskError whose cause the driver unwraps.
            self._load_error = exc
        except TypeError as exc:  # an option the teacher's constructor does not take
            self._load_error = ArcflowError(f"teacher {quote(teacher_name(teacher))}: {exc}")

    def _teacher(self):
        if self._load_error is not None:
            raise self._load_error
        return self.teacher

    def describe(self, prompts: Optional[list[str]], steps: int) -> dict[str, Any]:
        """Validate prompts and report what the dataset header needs about this teacher."""
        return describe_teacher(self._teacher(), prompts, steps)

    def location(self) -> dict[str, Any]:
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def run_shard(self, spec: DatasetSpec, url: str, plan: ShardPlan, batch_size: int) -> dict[str, Any]:
        """Compute the shard's trajectories (holding the teacher), then write and commit it."""
        self._teacher()  # raises a deferred load error
        with self._compute:
            started = time.perf_counter()  # after the lock: compute_s excludes waiting for the other task
            arrays = record_shard(self.teacher, spec, plan, batch_size)
        computed = time.perf_counter()
        commit_shard(url, spec, plan, arrays)
        done = time.perf_counter()
        return {
            "shard_id": plan.shard_id,
            "samples": len(plan),
            "compute_s": computed - started,
            "write_s": done - computed,
            **self.location(),
        }
