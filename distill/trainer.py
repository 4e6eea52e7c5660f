"""`arcflow distill`: stream committed shards into a LoRA + momentum-head student.

Read top-down from the CLI: :func:`distill` (the driver) checks everything a user can get wrong and
plans the run (:func:`~arcflow.distill.run_plan.plan_run`), then :func:`_fit` runs
:func:`~arcflow.distill.worker.ray_train_loop` on Ray Train's ``TorchTrainer`` (DDP over gloo on
CPU, NCCL on GPU; one worker is the local default, the same code path as a cluster) while this
process draws the one progress bar. Checkpoints go through ``ray.train.report`` and come back
through ``ray.train.get_checkpoint`` (:mod:`arcflow.distill.checkpoint`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from arcflow.core.driver_watch import driver_identity
from arcflow.core.ray_runtime import ray_session

from .checkpoint import CHECKPOINTS_DIR, KEEP_CHECKPOINTS, latest_checkpoint
from .config import DistillConfig
from .run_plan import DISTILL_CONFIG_FILE, FINGERPRINT_KEY, RunPlan, plan_run

if TYPE_CHECKING:
    from ray.util.queue import Queue
    from tqdm import tqdm

log = logging.getLogger(__name__)


def distill(config: DistillConfig) -> Path:
    """Validate, then train on Ray Train (``config.num_workers`` DDP workers); returns the run dir.

    Resuming a run that already reached ``iters`` (and exported) does nothing. A new run's
    directory is claimed only for good: if the job fails before its first checkpoint, what it
    wrote is removed again, so the corrected command can use the same ``--out``.
    """
    from .on_policy import resolve
    from .student import STUDENT_CONFIG_FILE

    config.validate()  # before _absolute_paths turns a URL --out into a local path
    config = resolve(_absolute_paths(config))  # a polish (--from RUN) trains RUN's student
    plan = plan_run(config)
    out = Path(config.out)
    if plan.resume_step >= config.iters and (out / STUDENT_CONFIG_FILE).is_file():
        log.info("%s already reached step %d of %d; nothing to do", out, plan.resume_step, config.iters)
        return out
    plan = dataclasses.replace(plan, driver=driver_identity())
    created = not out.exists()
    fresh = not (out / DISTILL_CONFIG_FILE).is_file()
    out.mkdir(parents=True, exist_ok=True)
    try:
        if fresh:
            saved = {**config.to_dict(), FINGERPRINT_KEY: plan.dataset_fingerprint}
            (out / DISTILL_CONFIG_FILE).write_text(json.dumps(saved, indent=2))
        _fit(config, plan)
    except BaseException:
        if fresh and latest_checkpoint(out) is None:
            _discard(out, created)
        raise
    return out


def _absolute_paths(config: DistillConfig) -> DistillConfig:
    """Ray Train workers run in their own working directory: pin local paths before starting."""
    changes = {"out": str(Path(config.out).resolve())}
    for name in ("dataset", "from_run", "prompts"):
        value = getattr(config, name)
        if value is not None and "://" not in value:
            changes[name] = str(Path(value).resolve())
    return dataclasses.replace(config, **changes)


def _discard(out: Path, created: bool) -> None:
    """Remove what a run that never reached a checkpoint wrote (``out`` was new or empty)."""
    if created:
        shutil.rmtree(out, ignore_errors=True)
        return
    for child in out.iterdir():
        shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)


def _fit(config: DistillConfig, plan: RunPlan) -> None:
    """Run the workers on Ray Train's ``TorchTrainer`` (a local cluster unless --ray-address)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue
    from tqdm.auto import tqdm

    from .worker import ray_train_loop

    out = Path(config.out)
    cpus_per_worker = max(1, (os.cpu_count() or 1) // config.num_workers)
    with (
        ray_session(config.ray_address, max(os.cpu_count() or 1, config.num_workers)),
        tqdm(total=config.iters, initial=plan.resume_step, desc="distill", unit="it",
             disable=None if config.progress else True, dynamic_ncols=True) as bar,
    ):
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
            # Ray's run directory is RUN/checkpoints: checkpoints and Ray's record of them, which
            # names them relative to it, so a moved or copied RUN resumes from its own.
            run_config=RunConfig(
                name=CHECKPOINTS_DIR,
                storage_path=str(out.resolve()),
                checkpoint_config=CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
                failure_config=FailureConfig(max_failures=config.max_failures),
            ),
        )
        _fit_with_progress(trainer.fit, bar, rows)


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
