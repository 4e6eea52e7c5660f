"""The generation worker: ``ShardWorker`` (a Ray actor's body) holds one teacher and turns shard
plans into committed shards; ``record_shard`` and ``commit_shard`` are its two halves.

The worker runs two shard tasks at a time (a threaded actor, see pipeline/generate.py): while one
task writes its shard to storage the other already computes the next one, so the teacher never
waits on I/O. Every teacher call runs on ONE dedicated thread (``TeacherThread``) that owns all the
worker's torch threads: OpenMP keeps a thread team per calling thread, and with a second team (Ray runs
tasks on a pool of threads) two torch threads ran at one thread's speed (our reading: libgomp then
sleeps between parallel regions), which halved a small teacher's throughput on 2 cores
(docs/benchmarks.md, Trajectory builder). Shard contents are pure functions of the plan
(pipeline/plan.py), so a retried shard is identical.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, TypeVar

import torch

from arcflow.core.errors import ArcflowError, quote
from arcflow.storage.format import DatasetSpec

from .plan import ShardPlan
from .registry import TeacherSource, teacher_name


T = TypeVar("T")


class TeacherThread:
    """One thread that runs every teacher call of a worker, one call at a time (it also serialises
    the two shard tasks' compute), with ``threads`` torch intra-op threads set on it."""

    def __init__(self, threads: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="arcflow-teacher")
        self.run(torch.set_num_threads, threads)

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on the teacher thread; its result, or its exception, here."""
        return self._pool.submit(fn, *args, **kwargs).result()


def _timed(fn: Callable[..., T], *args: Any) -> tuple[T, float]:
    started = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - started


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
        self._compute = TeacherThread(threads)
        # The writer's libraries now, while the worker starts: importing them during the first
        # shard's write would take the GIL from the teacher for seconds.
        import pandas  # noqa: F401  (pyarrow imports it when it builds the first index table: 0.4 s)
        import pyarrow.parquet  # noqa: F401
        import zarr.api.asynchronous  # noqa: F401
        options = dict(teacher_options)
        device = options.pop("device", None) or _pick_device(gpus)  # --device overrides the default
        self._load_error: Optional[ArcflowError] = None
        try:
            self.teacher = self._compute.run(load_teacher, teacher, device=device, **options)
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
        return self._compute.run(describe_teacher, self._teacher(), prompts, steps)

    def location(self) -> dict[str, Any]:
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def run_shard(self, spec: DatasetSpec, url: str, plan: ShardPlan, batch_size: int) -> dict[str, Any]:
        """Compute the shard's trajectories (holding the teacher), then write and commit it."""
        # compute_s is timed on the teacher thread: it excludes waiting for the other task's compute
        arrays, compute_s = self._compute.run(_timed, record_shard, self._teacher(), spec, plan, batch_size)
        _, write_s = _timed(commit_shard, url, spec, plan, arrays)
        return {
            "shard_id": plan.shard_id,
            "samples": len(plan),
            "compute_s": compute_s,
            "write_s": write_s,
            **self.location(),
        }
