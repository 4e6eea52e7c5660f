"""`generate-trajectories`: a pool of Ray actors runs the teacher over shard plans and commits shards.

Design (docs/architecture.md, Generation):
* shards are the unit of work; each actor (pipeline/shard_worker.py) loads the teacher once and
  works through shard plans, two at a time: one writes while the other computes;
* the work is handed out by Ray's ``ActorPool``;
* a dead actor is restarted by Ray and its in-flight shards retried on it (``max_restarts`` /
  ``max_task_retries``); a shard or worker beyond those limits stops the job, and ``--resume``
  continues it;
* shard contents are pure functions of the plan (pipeline/plan.py), so retries are identical.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

from arcflow.core.driver_watch import driver_identity
from arcflow.core.errors import ArcflowError, quote
from arcflow.core.ray_runtime import check_cluster_gpus, start_ray
from arcflow.storage._io import absolute_url
from arcflow.storage.format import GENERATION_KEY, LAYOUT_KEY, DatasetSpec

from .generation_config import GenerationConfig, default_threads, prompts_digest, read_prompts
from .plan import plan_shard, shard_length
from .registry import check_prompts
from .shard_worker import ShardWorker

log = logging.getLogger(__name__)

#: Shard tasks each worker runs at once (its actor's ``max_concurrency``, see pipeline/shard_worker.py).
IN_FLIGHT_PER_WORKER = 2
#: Ray's fault tolerance: restarts of one worker, and retries of one shard, within a job.
WORKER_RESTARTS = 3
SHARD_RETRIES = 3


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


def _make_actor_class(resources: dict[str, float]):
    """The worker actor: a threaded actor running ``IN_FLIGHT_PER_WORKER`` shard tasks at once.
    OpenMP keeps its default wait policy (spin briefly, then sleep): forcing ``PASSIVE`` put torch's
    threads to sleep after every small kernel and gave a 2-thread teacher 1-thread speed."""
    import ray

    return ray.remote(
        max_concurrency=IN_FLIGHT_PER_WORKER,
        max_restarts=WORKER_RESTARTS,
        max_task_retries=SHARD_RETRIES,
        **resources,
    )(ShardWorker)


def _check_cluster_gpus(config: GenerationConfig, gpus: float) -> None:
    """Refuse at once what would wait forever (workers asking for GPUs the cluster lacks) or fail
    in every worker (``--device cuda`` without a GPU)."""
    device = str(config.teacher_options.get("device") or "")
    if device.startswith("cuda") and not gpus:
        raise ArcflowError(f"--device {quote(device)}: the Ray cluster has no GPU; drop --device or add GPU nodes")
    if gpus:
        check_cluster_gpus(f"--workers {config.workers}", config.workers * gpus)


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
    from arcflow.storage.writer import check_dataset_target, dataset_lock

    config.validate()
    # Ray workers write the shards from their own working directory: give them an absolute --out
    config = dataclasses.replace(config, out=absolute_url(config.out))
    prompts = read_prompts(config.prompts_file)
    if prompts is not None:
        check_prompts(config.teacher, prompts)
    # before any cluster starts; the writer applies the same rule again with the full spec
    check_dataset_target(config.out, config.resume, generation=config.content_config(prompts))
    with dataset_lock(config.out):  # one writing job per dataset, for the whole job
        return _generate(config, prompts, progress, on_shard_committed)


def _generate(
    config: GenerationConfig, prompts: Optional[list[str]], progress: bool,
    on_shard_committed: Optional[Callable[[dict[str, Any]], None]],
) -> GenerationSummary:
    """The job itself, once its dataset is checked and held: start Ray, describe the teacher, write."""
    import ray

    from arcflow.storage.writer import create_or_open_dataset

    # claimed: the writer of a dataset this very job creates (removed again if no shard commits)
    claimed, actors = None, []
    # a local cluster has at least the cores the workers ask for
    started_ray = start_ray(config.ray_address, max(os.cpu_count() or 1, int(config.workers * (config.cpus_per_worker or 1))))
    try:
        total_gpus = ray.cluster_resources().get("GPU", 0)
        gpus = config.gpus_per_worker if config.gpus_per_worker is not None else (1.0 if total_gpus else 0.0)
        _check_cluster_gpus(config, gpus)
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
        todo = writer.pending_shards()
        log.info("%d shards planned, %d already committed, %d to generate on %d worker(s)",
                 spec.num_shards, spec.num_shards - len(todo), len(todo), len(actors))
        return _run_pool(config, spec, info["prompts"], actors, todo, progress, on_shard_committed)
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
    """The dataset header for a job: what the data is and how it was made (compared on resume). The
    job settings are recorded with their defaults resolved (guidance, the prompts' hash)."""
    prompts_sha256 = prompts_digest(info["prompts"])
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
            "prompts_sha256": prompts_sha256,
            "num_prompts": len(info["prompts"]),
            "true_cfg": info["true_cfg"],
            **({LAYOUT_KEY: info["conditioning_layout"]} if "conditioning_layout" in info else {}),
            GENERATION_KEY: {**config.content_config(info["prompts"]), "guidance": guidance,
                             "prompts_sha256": prompts_sha256},
        },
    )


def _run_pool(
    config: GenerationConfig, spec: DatasetSpec, prompts: list[str], actors: list, todo: list[int], progress: bool,
    on_shard_committed: Optional[Callable[[dict[str, Any]], None]],
) -> GenerationSummary:
    """Run the shards ``todo`` on the workers until all are committed. A worker that dies is Ray's to
    restart, and its shards Ray's to retry (``_make_actor_class``)."""
    import ray
    from ray.util import ActorPool
    from tqdm.auto import tqdm

    # ActorPool runs one task per handle: each handle twice keeps two shards on every (threaded) worker.
    pool = ActorPool([actor for actor in actors for _ in range(IN_FLIGHT_PER_WORKER)])

    def run_shard(actor: Any, shard_id: int) -> Any:
        plan = plan_shard(shard_id, config.num_samples, config.shard_size, prompts, config.seed, config.seeds_per_prompt)
        return actor.run_shard.remote(spec, config.out, plan, config.batch_size)

    total = spec.num_shards
    nodes: dict[str, int] = {}
    compute_s = write_s = 0.0
    written = 0
    generated = sum(shard_length(i, config.num_samples, config.shard_size) for i in todo)
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
        for shard_id in todo:
            pool.submit(run_shard, shard_id)  # beyond the free handles, the pool queues it
        while pool.has_next():
            try:
                result = pool.get_next_unordered()
            except ray.exceptions.RayError as exc:
                raise _unwrap(exc) from None
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
