"""`arcflow distill`: stream committed shards into a LoRA + momentum-head student.

Read top-down from the CLI: :func:`distill` (the driver) validates everything a user can get wrong
(:func:`check_run`), then :func:`_fit` runs :func:`train_worker` on Ray Train's ``TorchTrainer``
(DDP over gloo on CPU, NCCL on GPU; one worker is the local default, the same code path as a
cluster). Each worker runs :func:`setup`, then :func:`train_step` (the loss is
:func:`arcflow.distill.loss.segment_loss`) until ``--iters``, then rank 0 runs :func:`export`.
Checkpoints go through ``ray.train.report`` and come back through ``ray.train.get_checkpoint``
(:mod:`arcflow.distill.checkpoint`). The teacher's velocity is never evaluated: its transformer
only provides the frozen base weights under the LoRA adapters.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch
from torch import nn

from arcflow.core.driver_watch import driver_identity
from arcflow.core.ray_runtime import start_ray
from arcflow.core.errors import ArcflowError

from .checkpoint import (
    CHECKPOINTS_DIR,
    KEEP_CHECKPOINTS,
    Checkpoints,
    LocalCheckpoints,
    RayCheckpoints,
    checkpoint_step,
    latest_checkpoint,
    write_checkpoint,
)
from .config import DistillConfig
from .parallel import prepare_student
from .segments import segment_step_indices

if TYPE_CHECKING:
    from diffusers.training_utils import EMAModel

log = logging.getLogger(__name__)

DISTILL_CONFIG_FILE = "distill_config.json"
METRICS_FILE = "metrics.jsonl"
#: Key of ``distill_config.json`` holding the dataset fingerprint a run started on (checked on resume).
FINGERPRINT_KEY = "dataset_fingerprint"


def check_run(config: DistillConfig) -> dict[str, Any]:
    """Validate the config, the dataset and the output directory; returns dataset facts.

    Raises ``ArcflowError`` (one line) for: bad values, a missing dataset, a dataset with no
    committed shards or a damaged index part, more Ray Train workers than shards, weight groups
    that do not divide the latent channels, an NFE whose segment ends do not fall on recorded
    steps, and an ``--out`` holding another run (without ``--resume``) or a different run (with it:
    other settings or other data; a run directory may be moved or copied and resumed there).
    Everything a training worker would reject is refused here, before anything is written.
    """
    from arcflow.pipeline.registry import check_teacher_id, teacher_options_for_dataset
    from arcflow.storage import _io
    from arcflow.storage.reader import open_dataset

    config.validate()
    reader = open_dataset(config.dataset)
    committed = reader.require_committed_shards()
    selected = committed if config.shards is None else sorted(set(config.shards))
    missing = sorted(set(selected) - set(committed))
    if missing or not selected:
        raise ArcflowError(f"dataset {config.dataset}: shards {missing[:5]} are not committed")
    reader.shard_sizes(selected)  # one line naming a damaged index part
    if config.num_workers > len(selected):
        raise ArcflowError(
            f"--num-workers {config.num_workers} needs at least {config.num_workers} committed shards "
            f"(each worker streams its own); the dataset has {len(selected)}"
        )
    channels = int(reader.spec.latent_shape[-1])
    if channels % config.student.weight_groups:
        raise ArcflowError(f"--weight-groups {config.student.weight_groups} does not divide the {channels} latent channels")
    check_teacher_id(reader.spec.teacher_id)
    steps = int(reader.spec.steps)
    try:
        bounds = segment_step_indices(steps, config.student.nfe)
    except ValueError as exc:
        raise ArcflowError(f"--nfe {config.student.nfe} is not representable on this dataset: {exc}") from None
    fingerprint = reader.fingerprint()
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ArcflowError(f"--out {out} exists and is not a directory")
    _io.Location(str(out)).check_writable()
    saved = out / DISTILL_CONFIG_FILE
    resume_step, checkpoint = 0, None
    if saved.is_file():
        previous, previous_fingerprint = _read_saved_config(saved)
        if not config.resume:
            raise ArcflowError(f"{out} already holds a distill run; pass --resume to continue it or choose another --out")
        changed = config.differences(previous)
        if changed:
            raise ArcflowError(f"cannot resume {out}: these settings differ from the saved run: {', '.join(changed)}")
        if previous_fingerprint not in (None, fingerprint):
            raise ArcflowError(f"cannot resume {out}: the dataset's committed data differs from the data the run started on")
        checkpoint = latest_checkpoint(out)
        resume_step = checkpoint_step(checkpoint) if checkpoint is not None else 0
    elif out.exists() and any(out.iterdir()):
        raise ArcflowError(f"--out {out} exists and is not an arcflow distill run; choose an empty or new directory")
    return {
        "steps": steps,
        "bounds": bounds,
        "fingerprint": fingerprint,
        "resume_step": resume_step,
        # the newest checkpoint (workers prefer Ray Train's own record; this serves a run Ray never saw)
        "resume_checkpoint": str(checkpoint) if resume_step else None,
        "teacher": reader.spec.teacher_id,
        # diffusers teachers: resolution, dtype and guidance the data was recorded with ({} for digits)
        "teacher_options": teacher_options_for_dataset(reader.spec),
        # the recorded sigmas at the segment boundaries: the student's sampling schedule
        "segment_sigmas": [float(reader.spec.sigmas[i]) for i in bounds],
    }


def _read_saved_config(path: Path) -> tuple[DistillConfig, Optional[str]]:
    """A run's saved config and the dataset fingerprint it started on; one line if it is damaged."""
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise TypeError(f"a JSON object was expected, got {type(data).__name__}")
        return DistillConfig.from_dict(data), data.get(FINGERPRINT_KEY)
    except (ValueError, TypeError) as exc:
        raise ArcflowError(f"{path} is damaged ({exc}); resume is impossible, start a new --out") from None


def train_worker(
    config: DistillConfig,
    facts: dict[str, Any],
    rank: int = 0,
    world_size: int = 1,
    device: Optional[torch.device] = None,
    checkpoints: Optional[Checkpoints] = None,
) -> dict[str, Any]:
    """One worker's run: :func:`setup` (from the latest checkpoint when there is one), then
    :func:`train_step` up to ``config.iters`` with metrics and checkpoints on the way, then rank 0
    runs :func:`export`. ``checkpoints`` is Ray Train's (:class:`RayCheckpoints`) inside a
    Ray Train worker; the default writes the same checkpoint directories in this process."""
    checkpoints = checkpoints or LocalCheckpoints(Path(config.out), config.resume)
    run = setup(config, facts, rank, world_size, device or torch.device("cpu"), checkpoints.load())
    metrics = MetricsLog(Path(config.out) / METRICS_FILE, run.step) if rank == 0 else None
    row = None
    try:
        while run.step < config.iters:
            row = train_step(run)
            if metrics is not None and (run.step % config.log_every == 0 or run.step == config.iters):
                metrics.write(row)
            if run.step % config.checkpoint_every == 0 or run.step == config.iters:
                data = _gather(run.stream.state_dict(), world_size)  # every rank's data position
                write = functools.partial(checkpoint_files, run, data) if rank == 0 else None
                checkpoints.save(run.step, write, {"step": run.step, "loss": row["loss"]})
    finally:
        if metrics is not None:
            metrics.close()
    if rank == 0:
        export(run, facts)
    return {"step": run.step, "loss": row["loss"] if row is not None else None}


@dataclasses.dataclass
class Training:
    """One worker's training state: built by :func:`setup`, advanced by :func:`train_step`,
    checkpointed by :func:`checkpoint_files` and exported by :func:`export`."""

    config: DistillConfig
    bounds: list[int]
    device: torch.device
    rank: int
    world_size: int
    student: nn.Module  # the teacher's transformer with LoRA + the momentum head
    model: nn.Module  # what the loss calls: the student, or its DDP wrapper
    params: dict[str, nn.Parameter]  # the trainable parameters by name
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ema: Optional[EMAModel]
    stream: Any  # arcflow.storage.streaming.TrajectoryStream of this rank
    batches: Iterator[dict[str, Any]]
    step: int = 0


def setup(
    config: DistillConfig,
    facts: dict[str, Any],
    rank: int,
    world_size: int,
    device: torch.device,
    saved: Optional[dict[str, Any]],
) -> Training:
    """Build the student on the teacher's frozen weights, AdamW, the LR warm-up, the EMA and this
    rank's data stream; continue from ``saved`` (a :func:`read_checkpoint` result) if given."""
    from diffusers.optimization import get_constant_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    from arcflow.pipeline.registry import load_teacher
    from arcflow.storage.streaming import TrajectoryStream

    from .student import build_student

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    teacher = load_teacher(facts["teacher"], device=str(device), **facts.get("teacher_options", {}))
    # inplace: the teacher is only needed as the student's frozen base, so don't hold two copies.
    student = build_student(teacher, dataclasses.replace(config.student, init_seed=config.seed), inplace=True).to(device)
    params = {n: p for n, p in student.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(params.values(), lr=config.lr, weight_decay=config.weight_decay)
    ema = EMAModel(params.values(), decay=config.ema_decay) if config.ema_decay > 0 else None
    if ema is not None:
        ema.to(dtype=torch.float32)  # bf16 weights: average in float32 so small updates are not lost
    stream = TrajectoryStream(config.dataset, segment_bounds=facts["bounds"], rank=rank, world_size=world_size,
                              seed=config.seed, shuffle_buffer=config.shuffle_buffer, shards=config.shards)
    step = 0
    if saved is not None:
        step = int(saved["state"]["step"])
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(saved["trainable"][name])
        optimizer.load_state_dict(saved["optimizer"])
        if ema is not None and saved["ema"] is not None:
            counters = saved["state"].get("ema", {"optimization_step": step})  # older runs saved none
            ema.load_state_dict({**counters, "shadow_params": [saved["ema"][n] for n in params]})
        stream.load_state_dict(saved["state"]["data"][rank])
        log.info("resumed at step %d", step)
    # The LR is a function of the step alone (so --resume may extend --iters): rebuilt at ``step``.
    scheduler = get_constant_schedule_with_warmup(optimizer, config.warmup, last_epoch=step - 1)
    model = prepare_student(student, config, world_size)
    loader = torch.utils.data.DataLoader(stream, batch_size=config.batch_size, num_workers=config.loader_workers,
                                         pin_memory=device.type == "cuda")
    return Training(config, facts["bounds"], device, rank, world_size, student, model, params, optimizer,
                    scheduler, ema, stream, iter(loader), step)


def train_step(run: Training) -> dict[str, Any]:
    """One optimizer step on the next batch; returns the step's metrics row (JSON-able)."""
    from .loss import segment_loss

    config = run.config
    batch = next(run.batches)
    run.stream.mark_consumed(batch)  # the data position a checkpoint records
    # the stream's items are (sample, segment) pairs: one copy to the device, none back in the loss
    batch = {k: v.to(run.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=config.bf16):
        loss, per_segment = segment_loss(run.model, batch, len(run.bounds) - 1)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params.values(), config.grad_clip)
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    if run.ema is not None:
        run.ema.step(run.params.values())
    run.step += 1
    return {
        "step": run.step,
        "loss": loss.item(),
        # null where a segment was absent from the batch (NaN is not JSON)
        **{f"loss_segment_{i}": (None if v != v else v) for i, v in enumerate(per_segment.tolist())},
        "lr": lr,
        "grad_norm": float(grad_norm),
    }


def checkpoint_files(run: Training, data: list[dict[str, Any]], directory: Path) -> None:
    """Write the checkpoint of ``run`` at its current step into ``directory`` (rank 0)."""
    ema = None
    state: dict[str, Any] = {"step": run.step, "data": data, "config": run.config.to_dict()}
    if run.ema is not None:
        ema_state = run.ema.state_dict()
        ema = dict(zip(run.params, ema_state.pop("shadow_params")))
        state["ema"] = ema_state  # decay and update count (diffusers' EMAModel warms its decay up)
    write_checkpoint(directory, dict(run.params), ema, run.optimizer.state_dict(), state)


def export(run: Training, facts: dict[str, Any]) -> None:
    """Save the student (its EMA weights, if any) as the run's diffusers-style LoRA + head files."""
    from .student import save_student

    config = run.config
    extra = {"dataset_fingerprint": facts["fingerprint"], "nfe": config.student.nfe, "training": config.to_dict()}
    # what `arcflow sample` / distill.interop need to rebuild the teacher and the schedule
    extra["teacher_options"] = {k: v for k, v in facts.get("teacher_options", {}).items() if k != "text_encoders"}
    if "segment_sigmas" in facts:
        extra["segment_sigmas"] = facts["segment_sigmas"]
    if run.ema is not None:
        run.ema.copy_to(run.params.values())  # training is over: the export is the average
    save_student(run.student, Path(config.out), extra_config=extra)


def _gather(obj: Any, world_size: int) -> list[Any]:
    if world_size == 1:
        return [obj]
    out: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(out, obj)
    return out


class MetricsLog:
    """Rank 0's ``metrics.jsonl``: one row per logged step, plus the speed since the previous row.

    Opened after ``step`` (0: a new file), rows that a killed run logged past its last checkpoint
    are dropped first (atomically), so a resumed run never repeats a step.
    """

    def __init__(self, path: Path, step: int) -> None:
        if step > 0 and path.is_file():
            keep = []
            for line in path.read_text().splitlines():
                try:
                    if int(json.loads(line)["step"]) <= step:
                        keep.append(line + "\n")
                except (ValueError, KeyError, TypeError):  # a line cut short by the kill
                    continue
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(keep))
            os.replace(tmp, path)
        self.file = open(path, "w" if step == 0 else "a")
        self.time, self.step = time.perf_counter(), step

    def write(self, row: dict[str, Any]) -> None:
        now = time.perf_counter()
        row = {**row, "it_per_s": (row["step"] - self.step) / max(now - self.time, 1e-9)}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        self.time, self.step = now, row["step"]

    def close(self) -> None:
        self.file.close()


def _ray_train_loop(payload: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from arcflow.core.driver_watch import watch_driver

    watch_driver(payload["facts"].get("driver"))
    context = ray.train.get_context()
    config = DistillConfig.from_dict(payload["config"])
    train_worker(
        config,
        payload["facts"],
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        device=ray.train.torch.get_device(),
        checkpoints=RayCheckpoints(payload["facts"]["resume_checkpoint"]),
    )


def _absolute_paths(config: DistillConfig) -> DistillConfig:
    """Ray Train workers run in their own working directory: pin local paths before starting."""
    changes = {"out": str(Path(config.out).resolve())}
    if "://" not in config.dataset:
        changes["dataset"] = str(Path(config.dataset).resolve())
    return dataclasses.replace(config, **changes)


def distill(config: DistillConfig) -> Path:
    """Validate, then train on Ray Train (``config.num_workers`` DDP workers); returns the run dir.

    Resuming a run that already reached ``iters`` (and exported) does nothing. A new run's
    directory is claimed only for good: if the job fails before its first checkpoint, what it
    wrote is removed again, so the corrected command can use the same ``--out``.
    """
    from .student import STUDENT_CONFIG_FILE

    config.validate()  # before _absolute_paths turns a URL --out into a local path
    config = _absolute_paths(config)
    facts = check_run(config)
    out = Path(config.out)
    if facts["resume_step"] >= config.iters and (out / STUDENT_CONFIG_FILE).is_file():
        log.info("%s already reached step %d of %d; nothing to do", out, facts["resume_step"], config.iters)
        return out
    facts["driver"] = driver_identity()
    created = not out.exists()
    fresh = not (out / DISTILL_CONFIG_FILE).is_file()
    out.mkdir(parents=True, exist_ok=True)
    try:
        if fresh:
            (out / DISTILL_CONFIG_FILE).write_text(json.dumps({**config.to_dict(), FINGERPRINT_KEY: facts["fingerprint"]}, indent=2))
        _fit(config, facts)
    except BaseException:
        if fresh and latest_checkpoint(out) is None:
            _discard(out, created)
        raise
    return out


def _discard(out: Path, created: bool) -> None:
    """Remove what a run that never reached a checkpoint wrote (``out`` was new or empty)."""
    if created:
        shutil.rmtree(out, ignore_errors=True)
        return
    for child in out.iterdir():
        shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)


def _fit(config: DistillConfig, facts: dict[str, Any]) -> None:
    """Run :func:`train_worker` on Ray Train's ``TorchTrainer`` (a local cluster unless --ray-address)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = Path(config.out)
    cpus_per_worker = max(1, (os.cpu_count() or 1) // config.num_workers)
    started = start_ray(config.ray_address, max(os.cpu_count() or 1, config.num_workers))
    try:
        trainer = TorchTrainer(
            _ray_train_loop,
            train_loop_config={"config": config.to_dict(), "facts": facts},
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
        _fit_with_progress(trainer, out / METRICS_FILE, config, facts["resume_step"])
    finally:
        if started:
            ray.shutdown()


def _fit_with_progress(trainer: Any, metrics: Path, config: DistillConfig, initial: int) -> None:
    """``trainer.fit()`` in a thread while this (main) thread draws the one progress bar from the
    steps rank 0 logs to ``metrics.jsonl``; Ctrl-C still reaches the main thread at once."""
    import threading

    from tqdm.auto import tqdm

    failure: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # re-raised in the main thread
            failure.append(exc)

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    with tqdm(total=config.iters, initial=initial, desc="distill", unit="it",
              disable=None if config.progress else True, dynamic_ncols=True) as bar:
        while thread.is_alive():
            thread.join(timeout=0.5)
            last = _last_metrics(metrics)
            if last is not None and last["step"] > bar.n:
                bar.update(last["step"] - bar.n)
                bar.set_postfix(loss=f"{last['loss']:.4f}", refresh=False)
    if failure:
        raise failure[0]


def _last_metrics(path: Path) -> Optional[dict[str, Any]]:
    """The newest complete row of ``metrics.jsonl`` (None before the first)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = f.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None
