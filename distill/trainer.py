"""`arcflow distill`: stream committed shards into a LoRA + momentum-head student.

Read top-down from the CLI: :func:`distill` (the driver) checks everything a user can get wrong and
plans the run (:func:`~arcflow.distill.run_plan.plan_run`), then :func:`_fit` runs
:func:`~arcflow.distill.worker.ray_train_loop` on Ray Train's ``TorchTrainer`` (DDP over gloo on
CPU, NCCL on GPU; one worker is the local default, the same code path as a cluster) while this
process draws the one progress bar. Rank 0 writes the checkpoints into the run directory itself and
every worker continues from the newest intact one (:mod:`arcflow.distill.checkpoint`); Ray Train
carries only the metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

from arcflow.core.driver_watch import driver_identity
from arcflow.core.errors import ArcflowError
from arcflow.core.ray_runtime import check_cluster_gpus, ray_session

from .checkpoint import CHECKPOINTS_DIR, find_checkpoint, forget_ray_record
from .config import DistillConfig
from .run_plan import DISTILL_CONFIG_FILE, FINGERPRINT_KEY, RunPlan, find_resume, plan_run
from .worker import METRICS_FILE, STOP_FILE

if TYPE_CHECKING:
    from ray.util.queue import Queue
    from tqdm import tqdm

log = logging.getLogger(__name__)


def distill(config: DistillConfig) -> Path:
    """Validate, then train on Ray Train (``config.num_workers`` DDP workers); returns the run dir.

    The run directory is held exclusively for the job (:func:`hold_run`): a second job on it is
    refused in one line. Resuming a run that already reached ``iters`` (and exported) does nothing.
    A run directory is claimed only for good: if the job fails or is interrupted before its first
    checkpoint, what it wrote is removed again, so the corrected command can use the same ``--out``.
    """
    from .on_policy import resolve
    from .student import STUDENT_CONFIG_FILE

    config.validate()  # before _absolute_paths turns a URL --out into a local path
    config = resolve(_absolute_paths(config))  # a polish (--from RUN) trains RUN's student
    plan = plan_run(config)  # everything a user can get wrong, before anything is written
    out = Path(config.out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    with hold_run(out):
        found = find_resume(config, plan.dataset_fingerprint)  # again: another job may have ended meanwhile
        if found.damaged:
            log.warning("%s", found.describe())
        plan = dataclasses.replace(plan, resume_step=found.step, driver=driver_identity(),
                                   resume_checkpoint=str(found.path) if found.path is not None else None)
        if plan.resume_step >= config.iters and (out / STUDENT_CONFIG_FILE).is_file():
            log.info("%s already reached step %d of %d; nothing to do", out, plan.resume_step, config.iters)
            return out
        try:
            if plan.resume_step == 0:
                _start_afresh(out, {**config.to_dict(), FINGERPRINT_KEY: plan.dataset_fingerprint})
            _fit(config, plan)
        except BaseException:  # errors, Ctrl-C, and whatever a SIGTERM handler raises
            if plan.resume_step == 0 and find_checkpoint(out).path is None:
                _discard(out, created)
            raise
    return out


@contextlib.contextmanager
def hold_run(out: Path) -> Iterator[None]:
    """Hold ``out`` (a directory) exclusively while the block runs: ``flock`` on the directory
    itself, so nothing is added to it and the OS releases the lock when the job dies."""
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ArcflowError(f"another arcflow distill job is using {out}; wait for it to end or choose another --out") from None
        yield
    finally:
        os.close(fd)


def _absolute_paths(config: DistillConfig) -> DistillConfig:
    """Ray Train workers run in their own working directory: pin local paths before starting."""
    changes = {"out": str(Path(config.out).resolve())}
    for name in ("dataset", "from_run", "prompts"):
        value = getattr(config, name)
        if value is not None and "://" not in value:
            changes[name] = str(Path(value).resolve())
    return dataclasses.replace(config, **changes)


#: What a distill job writes into its run directory before its first checkpoint.
_RUN_FILES = (DISTILL_CONFIG_FILE, METRICS_FILE, CHECKPOINTS_DIR, STOP_FILE)


def _remove_run_files(out: Path) -> None:
    """Remove what a job that never reached a checkpoint left in ``out`` (links, never their targets)."""
    for name in _RUN_FILES:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            path.unlink()


def _start_afresh(out: Path, saved: dict[str, Any]) -> None:
    """A new run in ``out``: what an earlier job left before its first checkpoint goes, then the
    run's settings (compared on ``--resume``) are written atomically."""
    _remove_run_files(out)
    tmp = out / f".{DISTILL_CONFIG_FILE}.tmp"
    tmp.write_text(json.dumps(saved, indent=2))
    os.replace(tmp, out / DISTILL_CONFIG_FILE)


def _discard(out: Path, created: bool) -> None:
    """Remove what a run that never reached a checkpoint wrote (the whole ``out`` if it was new)."""
    if created:
        shutil.rmtree(out, ignore_errors=True)
    else:
        _remove_run_files(out)


def _fit(config: DistillConfig, plan: RunPlan) -> None:
    """Run the workers on Ray Train's ``TorchTrainer`` (a local cluster unless --ray-address)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue
    from tqdm.auto import tqdm

    from .worker import ray_train_loop

    out = Path(config.out)
    forget_ray_record(out)  # Ray Train must not restore or delete what an earlier job's record names
    (out / STOP_FILE).unlink(missing_ok=True)  # an earlier job's stop request
    cpus_per_worker = max(1, (os.cpu_count() or 1) // config.num_workers)
    with (
        ray_session(config.ray_address, max(os.cpu_count() or 1, config.num_workers)),
        tqdm(total=config.iters, initial=plan.resume_step, desc="distill", unit="it",
             disable=None if config.progress else True, dynamic_ncols=True) as bar,
    ):
        if config.use_gpu:  # Ray would wait for missing GPUs forever
            check_cluster_gpus("--use-gpu", config.num_workers)
        # after_report runs in Ray's controller actor, not here, and reports faster than its 2 s poll stall workers
        rows = None if bar.disable else Queue(actor_options={"num_cpus": 0})
        trainer = TorchTrainer(
            ray_train_loop,
            train_loop_config={"config": config.to_dict(), "plan": plan, "progress": rows},
            scaling_config=ScalingConfig(
                num_workers=config.num_workers,
                use_gpu=config.use_gpu,
                # Locally, split the machine's cores between the workers (torch threads follow).
                resources_per_worker=None if config.ray_address or config.use_gpu else {"CPU": cpus_per_worker},
            ),
            # Ray's run directory is RUN/checkpoints, but arcflow writes, finds and prunes the
            # checkpoints itself (checkpoint.py): Ray Train only carries the metrics.
            run_config=RunConfig(
                name=CHECKPOINTS_DIR,
                storage_path=str(out.resolve()),
                failure_config=FailureConfig(max_failures=config.max_failures),
            ),
        )
        try:
            _fit_with_progress(trainer.fit, bar, rows)
        except BaseException:  # Ctrl-C, SIGTERM or a failure: no worker trains on or exports
            (out / STOP_FILE).touch()
            raise


def _fit_with_progress(fit: Callable[[], Any], bar: tqdm, rows: Optional[Queue]) -> None:
    """``fit()`` in a thread while this (main) thread moves ``bar`` to the newest row rank 0 put on
    ``rows``; Ctrl-C still reaches the main thread at once."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            fit()
        except BaseException as exc:  # re-raised in the main thread
            failure.append(exc)

    thread = threading.Thread(target=run, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)
        logged = rows.get_nowait_batch(rows.qsize()) if rows is not None else []
        if logged and logged[-1]["step"] > bar.n:
            bar.update(logged[-1]["step"] - bar.n)
            bar.set_postfix(loss=f"{logged[-1]['loss']:.4f}", refresh=False)
    if failure:
        raise failure[0]
