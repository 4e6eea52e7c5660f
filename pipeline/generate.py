"""`generate-trajectories`: a pool of Ray actors runs the teacher over shard plans and commits shards.

Design (docs/architecture.md, Generation):
* shards are the unit of work; each actor loads the teacher once and works through shard plans;
* every actor runs two shard tasks at a time (a threaded actor): the teacher is guarded by a lock,
  so while one task writes its shard to storage the other already computes the next one, and the
  teacher never waits on I/O;
* a dead actor is restarted by Ray and its in-flight shards retried on it (``max_restarts`` /
  ``max_task_retries``); a shard or worker beyond those limits stops the job, and ``--resume``
  continues it;
* shard contents are pure functions of the plan (pipeline/plan.py), so retries are identical.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from arcflow.core.errors import ArcflowError, check_numbers
from arcflow.core.ray_runtime import check_local_workers, start_ray
from arcflow.storage.format import DEFAULT_KEYFRAME_EVERY, GENERATION_KEY, STORAGE_DTYPES, DatasetSpec

from arcflow.core.driver_watch import driver_identity
from .plan import ShardPlan, num_shards, plan_shard, shard_length
from .registry import TeacherSource, teacher_name

log = logging.getLogger(__name__)

IN_FLIGHT_PER_WORKER = 2
#: Ray's fault tolerance: restarts of one worker, and retries of one shard, within a job.
WORKER_RESTARTS = 3
SHARD_RETRIES = 3
#: Sanity limits: far beyond any real job, low enough that planning and validation stay instant.
MAX_SAMPLES = 10**9
MAX_SHARDS = 10**6
MAX_STEPS = 10_000
MAX_WORKERS = 100_000
MAX_SHARD_SIZE = 1_000_000
MAX_THREADS = 1024
#: The float32 trajectories of one shard (and of one micro-batch) a worker holds while recording.
MAX_SHARD_BYTES = 64 * 2**30


@dataclass
class GenerationConfig:
    """Everything `arcflow generate-trajectories` needs; written into the dataset for reproduction.

    ``teacher`` is a registry id (what the CLI passes) or, from Python, a ``TeacherFactory`` that
    the Ray workers call (benchmarks and tests use it for stand-in teachers).
    """

    out: str
    teacher: TeacherSource = "digits"
    num_samples: int = 1000
    prompts_file: Optional[str] = None
    steps: int = 50
    guidance: Optional[float] = None
    shard_size: int = 256
    seed: int = 0
    batch_size: int = 256
    dtype: str = "float16"
    #: format v2 stores the state at every ``keyframe_every``-th step (and the last); 1 keeps them all
    keyframe_every: int = DEFAULT_KEYFRAME_EVERY
    #: consecutive samples per prompt (several seeds of one prompt in one shard share its stored conditioning)
    seeds_per_prompt: int = 1
    compress: bool = True
    workers: int = 1
    cpus_per_worker: Optional[float] = None
    #: torch intra-op threads per worker (None: the worker's CPUs but one, see ``default_threads``).
    threads: Optional[int] = None
    gpus_per_worker: Optional[float] = None
    ray_address: Optional[str] = None
    resume: bool = False
    teacher_options: dict[str, Any] = field(default_factory=dict)

    #: Fields that do not change a dataset's contents (may differ on --resume).
    RUNTIME_FIELDS = ("out", "workers", "cpus_per_worker", "gpus_per_worker", "threads", "ray_address", "resume")

    def validate(self) -> None:
        """Raise ``ArcflowError`` with one line for a value no run could use (before anything starts)."""
        check_numbers(
            self,
            positive=("num_samples", "steps", "shard_size", "batch_size", "workers", "keyframe_every", "seeds_per_prompt"),
            at_most={"num_samples": MAX_SAMPLES, "steps": MAX_STEPS, "workers": MAX_WORKERS, "keyframe_every": MAX_STEPS,
                     "seeds_per_prompt": MAX_SAMPLES,
                     "shard_size": MAX_SHARD_SIZE, "batch_size": MAX_SHARD_SIZE},
        )
        if self.threads is not None and not 1 <= self.threads <= MAX_THREADS:
            raise ArcflowError(f"--threads must be from 1 to {MAX_THREADS}, got {self.threads}")
        shards = -(-self.num_samples // self.shard_size)
        if shards > MAX_SHARDS:
            raise ArcflowError(
                f"{self.num_samples} samples in shards of {self.shard_size} make {shards} shards (at most "
                f"{MAX_SHARDS}); raise --shard-size"
            )
        if self.guidance is not None and self.guidance < 0:
            raise ArcflowError(f"--guidance must be >= 0, got {self.guidance}")
        check_local_workers("--workers", self.workers, self.ray_address)
        for name in ("cpus_per_worker", "gpus_per_worker"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ArcflowError(f"{name} must be >= 0, got {value}")
        if self.dtype not in STORAGE_DTYPES:
            raise ArcflowError(f"unknown --dtype {self.dtype!r}; choose one of {', '.join(STORAGE_DTYPES)}")
        if not self.out:
            raise ArcflowError("--out is required")
        if isinstance(self.teacher, str):
            from .registry import check_teacher_id

            check_teacher_id(self.teacher)
        elif not callable(self.teacher) or not isinstance(getattr(self.teacher, "teacher_id", None), str):
            raise ArcflowError(f"teacher must be a teacher id or a TeacherFactory, got {self.teacher!r}")

    def check_memory(self, latent_shape: Sequence[int]) -> None:
        """Refuse a shard or micro-batch that could never fit in a worker's memory, before any work."""
        per_sample = 4 * (2 * self.steps + 1) * math.prod(latent_shape)  # float32 x and u, as recorded
        for flag, count in (("--shard-size", self.shard_size), ("--batch-size", self.batch_size)):
            if count * per_sample > MAX_SHARD_BYTES:
                raise ArcflowError(
                    f"{flag} {count} needs {count * per_sample / 2**30:.0f} GiB per worker for its trajectories "
                    f"(at most {MAX_SHARD_BYTES / 2**30:.0f} GiB); lower it"
                )

    def content_config(self) -> dict[str, Any]:
        """The configuration that determines the dataset's bytes (compared on resume); JSON-ready,
        with a factory recorded by its ``teacher_id``."""
        config = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self.RUNTIME_FIELDS}
        config["teacher"] = teacher_name(self.teacher)
        config["teacher_options"] = dict(self.teacher_options)
        return config


def read_prompts(path: Optional[str]) -> Optional[list[str]]:
    """Prompts from a text file, one per line (blank lines skipped); None means the teacher's own."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise ArcflowError(f"prompts file not found: {path}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ArcflowError(f"prompts file {path} is not UTF-8 text (bad byte at offset {exc.start})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ArcflowError(f"prompts file is empty: {path}")
    return prompts


def _pick_device(gpus: float) -> str:
    return "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"


def describe_teacher(teacher: Any, prompts: Optional[list[str]], steps: int) -> dict[str, Any]:
    """Validate ``prompts`` (None: the teacher's own) and collect what a dataset header needs."""
    prompts = prompts if prompts is not None else teacher.prompt_set()
    teacher.validate_prompts(prompts)
    cond = teacher.encode_prompts(prompts[:1])
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
    }


def record_shard(teacher: Any, spec: DatasetSpec, plan: ShardPlan, batch_size: int) -> dict[str, Any]:
    """Run the teacher's recording sampler over one shard plan; returns CPU arrays to commit."""
    from .recording import record_trajectories

    with torch.inference_mode():
        cond = teacher.encode_prompts(list(plan.prompts))
        noise = teacher.noise(plan.seeds)
        # One constant micro-batch size for the whole job: a sample's trajectory is then
        # bit-identical whichever shard or position it lands in (pipeline/recording.py).
        x, u, sigmas = record_trajectories(teacher, cond, noise, steps=spec.steps, guidance=spec.guidance,
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
            # Keep it and raise it from the first task: a RayTaskError whose cause _unwrap returns.
            self._load_error = exc
        except TypeError as exc:  # an option the teacher's constructor does not take
            self._load_error = ArcflowError(f"teacher {teacher_name(teacher)!r}: {exc}")

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


@dataclass
class GenerationSummary:
    """What a run did: committed shards, where they were computed, and how fast."""

    url: str
    num_samples: int
    shards_total: int
    shards_skipped: int
    shards_written: int
    seconds: float
    samples_per_second: float
    nodes: dict[str, int]
    compute_seconds: float
    write_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _default_cpus_per_worker(workers: int) -> float:
    """CPU workers share the cluster's cores evenly (a single local worker gets them all, and sets
    torch's thread count from them), but never ask for more than the largest node has: an actor
    that fits on no node would wait forever."""
    import ray

    total = int(ray.cluster_resources().get("CPU", 1))
    per_node = [n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    largest = int(max(per_node)) if per_node else total
    return float(max(1, min(total // workers, largest)))


def default_threads(cpus: float) -> int:
    """torch threads for a worker with ``cpus`` CPUs: all but one, which stays free for the shard
    being written while the next one computes (and for Ray's own processes)."""
    return max(1, int(cpus) - 1)


def _make_actor_class(resources: dict[str, float]):
    """The worker actor. OpenMP threads sleep instead of spinning when they wait: the worker's own
    write thread and Ray's processes share its cores, and spinning torch threads that lose their
    core to them stall every parallel region (10x slower on a busy 2-core machine)."""
    import ray

    return ray.remote(
        max_concurrency=IN_FLIGHT_PER_WORKER,
        max_restarts=WORKER_RESTARTS,
        max_task_retries=SHARD_RETRIES,
        runtime_env={"env_vars": {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}},
        **resources,
    )(ShardWorker)


def _unwrap(exc: BaseException) -> BaseException:
    """Ray wraps remote exceptions; surface our own user errors unchanged."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, ArcflowError) else exc


def generate_trajectories(
    config: GenerationConfig,
    progress: bool = True,
    on_shard_committed: Optional[Callable[[dict[str, Any]], None]] = None,
) -> GenerationSummary:
    """Run (or resume) a generation job; returns a summary. See the module docstring."""
    import ray

    from arcflow.storage.writer import check_dataset_target, create_or_open_dataset

    config.validate()
    prompts = read_prompts(config.prompts_file)
    # before any cluster starts; the writer applies the same rule again with the full spec
    check_dataset_target(config.out, config.resume, generation=config.content_config())
    # claimed: the writer of a dataset this very job creates (removed again if no shard commits)
    claimed, actors = None, []
    # a local cluster has at least the cores the workers ask for
    started_ray = start_ray(config.ray_address, max(os.cpu_count() or 1, int(config.workers * (config.cpus_per_worker or 1))))
    try:
        total_gpus = ray.cluster_resources().get("GPU", 0)
        gpus = config.gpus_per_worker if config.gpus_per_worker is not None else (1.0 if total_gpus else 0.0)
        cpus = config.cpus_per_worker
        if cpus is None:
            cpus = 1.0 if gpus else _default_cpus_per_worker(config.workers)
        actor_cls = _make_actor_class({"num_cpus": cpus, "num_gpus": gpus})
        threads = config.threads or default_threads(cpus)
        driver = driver_identity()
        actors = [actor_cls.remote(config.teacher, config.teacher_options, threads, gpus, driver)
                  for _ in range(config.workers)]
        try:
            info = ray.get(actors[0].describe.remote(prompts, config.steps))
            # Every worker up (process started, teacher loaded) before the clock starts: the
            # summary's throughput is then the steady state, and no shard waits on a loading actor.
            ray.get([a.location.remote() for a in actors[1:]])
        except ray.exceptions.RayError as exc:
            raise _unwrap(exc) from None
        guidance = config.guidance if config.guidance is not None else info["default_guidance"]
        config.check_memory(info["latent_shape"])
        spec = dataset_spec(config, info, guidance)
        writer = create_or_open_dataset(config.out, spec, resume=config.resume)
        if writer.created:
            claimed = writer
        committed = writer.committed_shards()
        total = num_shards(config.num_samples, config.shard_size)
        todo = [i for i in range(total) if i not in committed]
        log.info("%d shards planned, %d already committed, %d to generate on %d worker(s)",
                 total, total - len(todo), len(todo), len(actors))

        def make_plan(shard_id: int) -> ShardPlan:
            return plan_shard(shard_id, config.num_samples, config.shard_size, info["prompts"], config.seed,
                              config.seeds_per_prompt)

        return _run_pool(config, spec, actors, todo, total, make_plan, progress, on_shard_committed)
    except BaseException:
        if claimed is not None:
            with contextlib.suppress(Exception):  # never hide the error that got us here
                for actor in actors:  # a shard still in flight must not write after the discard
                    ray.kill(actor, no_restart=True)
                claimed.discard()  # refused once a shard is committed; frees --out otherwise
        raise
    finally:
        if started_ray:
            ray.shutdown()


def dataset_spec(config: GenerationConfig, info: dict[str, Any], guidance: float) -> DatasetSpec:
    """The dataset header for a job: what the data is and how it was made (compared on resume)."""
    prompts_blob = "\n".join(info["prompts"]).encode()
    return DatasetSpec(
        teacher_id=info["teacher_id"],
        teacher_revision=info["revision"],
        latent_shape=tuple(info["latent_shape"]),
        sigmas=tuple(info["sigmas"]),
        shift=info["shift"],
        guidance=guidance,
        num_samples=config.num_samples,
        shard_size=config.shard_size,
        seed=config.seed,
        cond_spec={k: (tuple(v["shape"]), "float32") for k, v in info["cond_spec"].items()},
        prompts_source=config.prompts_file or f"teacher:{info['teacher_id']}",
        storage_dtype=config.dtype,
        keyframe_every=config.keyframe_every,
        compression="blosc-zstd" if config.compress else "none",
        extra={
            "prompts_sha256": hashlib.sha256(prompts_blob).hexdigest(),
            "num_prompts": len(info["prompts"]),
            "true_cfg": info["true_cfg"],
            GENERATION_KEY: config.content_config(),
        },
    )


def _run_pool(config, spec, actors, todo, total, make_plan, progress, on_shard_committed) -> GenerationSummary:
    """Keep ``IN_FLIGHT_PER_WORKER`` shards on every worker until all are committed. A worker that
    dies is Ray's to restart, and its shards Ray's to retry (``_make_actor_class``)."""
    import ray
    from tqdm.auto import tqdm

    queue = list(todo)
    in_flight: dict[Any, Any] = {}  # task -> the worker it runs on
    nodes: dict[str, int] = {}
    compute_s = write_s = 0.0
    written = 0
    generated = sum(shard_length(i, config.num_samples, config.shard_size) for i in todo)

    def submit(actor: Any) -> None:
        plan = make_plan(queue.pop(0))
        in_flight[actor.run_shard.remote(spec, config.out, plan, config.batch_size)] = actor

    t0 = time.perf_counter()
    bar = tqdm(
        total=config.num_samples,
        initial=config.num_samples - generated,
        unit="sample",
        desc="trajectories",
        disable=None if progress else True,  # None: off when stderr is not a terminal
        dynamic_ncols=True,
    )
    try:
        for _ in range(IN_FLIGHT_PER_WORKER):
            for actor in actors:
                if queue:
                    submit(actor)
        while in_flight:
            (done,), _ = ray.wait(list(in_flight), num_returns=1)
            actor = in_flight.pop(done)
            try:
                result = ray.get(done)
            except ray.exceptions.RayError as exc:
                raise _unwrap(exc) from None
            if queue:
                submit(actor)
            written += 1
            compute_s += result["compute_s"]
            write_s += result["write_s"]
            nodes[result["node_id"]] = nodes.get(result["node_id"], 0) + 1
            bar.update(result["samples"])
            bar.set_postfix(shards=f"{total - len(todo) + written}/{total}", refresh=False)
            if on_shard_committed is not None:
                on_shard_committed(result)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    return GenerationSummary(
        url=config.out,
        num_samples=config.num_samples,
        shards_total=total,
        shards_skipped=total - len(todo),
        shards_written=written,
        seconds=seconds,
        samples_per_second=generated / seconds if seconds > 0 else 0.0,
        nodes=nodes,
        compute_seconds=compute_s,
        write_seconds=write_s,
    )
