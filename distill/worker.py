"""What every Ray Train worker runs, top to bottom.

:func:`ray_train_loop` (Ray Train's entry) calls :func:`train_worker`: :func:`setup` (from the
latest checkpoint when there is one), then :func:`train_step` (the loss is
:func:`arcflow.distill.loss.segment_loss`) up to ``--iters`` with rank 0 logging ``metrics.jsonl``
and every rank checkpointing on the way, then rank 0 runs :func:`export`; a stopped driver stops them all before their next step (:data:`STOP_FILE`). Offline the teacher's
velocity is never evaluated: its transformer only provides the frozen base weights under the LoRA
adapters; on-policy (:mod:`arcflow.distill.on_policy`) that same base, tied, gives the targets.
Tests and benchmarks call :func:`train_worker` in their own process (no Ray).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import torch
from torch import nn

from arcflow.core.errors import ArcflowError

from .checkpoint import Checkpoints, LocalCheckpoints, RayCheckpoints, check_finite, write_checkpoint
from .config import DistillConfig
from .parallel import prepare_student
from .run_plan import RunPlan

if TYPE_CHECKING:
    from diffusers.training_utils import EMAModel

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
#: Written into the run directory by a driver that was stopped (Ctrl-C, SIGTERM): every worker
#: stops before its next step and exports nothing, however long Ray takes to end it.
STOP_FILE = ".stop"


class Stopped(Exception):
    """The driver of this run was stopped (its :data:`STOP_FILE` appeared)."""


def stop_if_requested(out: Path) -> None:
    """Raise :class:`Stopped` when the driver asked the workers to stop (or removed the run it
    never checkpointed)."""
    if os.path.lexists(out / STOP_FILE) or not out.is_dir():
        raise Stopped(f"{out}: the driver was stopped")


def ray_train_loop(payload: dict[str, Any]) -> None:
    """Ray Train's per-worker entry: ``payload`` is the config (as a dict), the :class:`RunPlan` and
    the driver's progress queue (None without a bar)."""
    import ray.train
    import ray.train.torch

    from arcflow.core.driver_watch import watch_driver

    plan: RunPlan = payload["plan"]
    watch_driver(plan.driver)
    context = ray.train.get_context()
    progress = payload["progress"]
    config = DistillConfig.from_dict(payload["config"])
    train_worker(
        config,
        plan,
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        device=ray.train.torch.get_device(),
        checkpoints=RayCheckpoints(Path(config.out)),
        progress=progress.put_nowait if progress is not None else None,
    )


def train_worker(
    config: DistillConfig,
    plan: RunPlan,
    rank: int = 0,
    world_size: int = 1,
    device: Optional[torch.device] = None,
    checkpoints: Optional[Checkpoints] = None,
    progress: Optional[Callable[[dict[str, Any]], None]] = None,
) -> dict[str, Any]:
    """One worker's run: :func:`setup` (from the latest checkpoint when there is one), then
    :func:`train_step` up to ``config.iters`` with metrics and checkpoints on the way, then rank 0
    runs :func:`export`. ``checkpoints`` is :class:`RayCheckpoints` inside a Ray Train
    worker (it also reports to Ray); the default writes the same checkpoint directories in this process.
    ``progress`` is called with each row rank 0 logs (the driver's progress bar)."""
    checkpoints = checkpoints or LocalCheckpoints(Path(config.out), config.resume)
    run = setup(config, plan, rank, world_size, device or torch.device("cpu"), checkpoints.load())
    metrics = MetricsLog(Path(config.out) / METRICS_FILE, run.step) if rank == 0 else None
    row = None
    try:
        while run.step < config.iters:
            stop_if_requested(Path(config.out))
            row = train_step(run)
            if metrics is not None and (run.step % config.log_every == 0 or run.step == config.iters):
                metrics.write(row)
                if progress is not None:
                    progress(row)
            if run.step % config.checkpoint_every == 0 or run.step == config.iters:
                data = _gather(run.stream.state_dict(), world_size)  # every rank's data position
                write = functools.partial(checkpoint_files, run, data) if rank == 0 else None
                checkpoints.save(run.step, write, {"step": run.step, "loss": row["loss"]})
                run.checkpointed = run.step
    finally:
        if metrics is not None:
            metrics.close()
    stop_if_requested(Path(config.out))
    if rank == 0:
        export(run, plan)
    return {"step": run.step, "loss": row["loss"] if row is not None else None}


@dataclasses.dataclass
class Training:
    """One worker's training state: built by :func:`setup`, advanced by :func:`train_step`,
    checkpointed by :func:`checkpoint_files` and exported by :func:`export`."""

    config: DistillConfig
    num_segments: int
    device: torch.device
    rank: int
    world_size: int
    student: nn.Module  # the teacher's transformer with LoRA + the momentum head
    model: nn.Module  # what the loss calls: the student, or its DDP wrapper
    params: dict[str, nn.Parameter]  # the trainable parameters by name
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ema: Optional[EMAModel]
    stream: Any  # arcflow.storage.streaming.TrajectoryStream of this rank (on-policy: on_policy.PromptStream)
    batches: Iterator[dict[str, Any]]
    step: int = 0
    #: The step of the newest checkpoint (written or resumed from); 0: none yet.
    checkpointed: int = 0
    #: On-policy: the tied teacher and the rollout's settings (None offline).
    on_policy: Optional[tuple[Any, Any]] = None
    #: The student's sampling schedule (the export's ``segment_sigmas``).
    segment_sigmas: Optional[list[float]] = None
    #: Teacher evaluations spent before this run's own (the dataset's, or the parent run's).
    teacher_evals_before: int = 0

    @property
    def teacher_evals(self) -> int:
        """Teacher network evaluations so far: the data's cost plus (on-policy) the rollouts'."""
        return self.teacher_evals_before + int(getattr(self.stream, "teacher_evals", 0))


def setup(
    config: DistillConfig,
    plan: RunPlan,
    rank: int,
    world_size: int,
    device: torch.device,
    saved: Optional[dict[str, Any]],
) -> Training:
    """Build the student on the teacher's frozen weights, AdamW, the LR warm-up, the EMA and this
    rank's data stream; continue from ``saved`` (a
    :func:`~arcflow.distill.checkpoint.read_checkpoint` result) if given."""
    from arcflow.pipeline.registry import load_teacher
    from arcflow.storage.streaming import TrajectoryStream

    from . import on_policy
    from .optim import make_ema, make_optimizer, make_scheduler
    from .student import build_student

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    teacher = load_teacher(plan.teacher_id, device=str(device), **plan.teacher_options)
    # on-policy, the teacher's velocity comes from the student's own base: capture its output projection first
    tied = on_policy.TiedTeacher.capture(teacher, config.student) if config.on_policy else None
    # inplace: the teacher is only needed as the student's frozen base, so don't hold two copies.
    student = build_student(teacher, dataclasses.replace(config.student, init_seed=config.seed), inplace=True).to(device)
    if config.from_run is not None and saved is None:
        on_policy.parent_weights(student, config.from_run)
    params = {n: p for n, p in student.named_parameters() if p.requires_grad}
    optimizer = make_optimizer(params, config)
    ema = make_ema(params.values(), config)
    if tied is None:
        stream = TrajectoryStream(config.dataset, segment_sigmas=plan.segment_sigmas, rank=rank, world_size=world_size,
                                  seed=config.seed, shuffle_buffer=config.shuffle_buffer, shards=config.shards)
        sigmas, rollout = plan.segment_sigmas, None
    else:
        stream = on_policy.PromptStream(teacher, on_policy.read_prompts(config.prompts, teacher), config.batch_size,
                                        config.seed, rank, device)
        guidance = plan.guidance if plan.guidance is not None else teacher.default_guidance
        sigmas = on_policy.segment_sigmas(config.student.nfe, teacher.shift)
        rollout = (tied, on_policy.RolloutSettings.of(config, teacher.shift, guidance))
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
    scheduler = make_scheduler(optimizer, config, step)
    model = prepare_student(student, config, world_size)
    loader = stream if tied is not None else torch.utils.data.DataLoader(
        stream, batch_size=config.batch_size, num_workers=config.loader_workers, pin_memory=device.type == "cuda")
    return Training(config, config.student.nfe, device, rank, world_size, student, model, params, optimizer,
                    scheduler, ema, stream, iter(loader), step, checkpointed=step, on_policy=rollout, segment_sigmas=sigmas,
                    teacher_evals_before=plan.teacher_evals)


class MetricsLog:
    """Rank 0's ``metrics.jsonl``: one row per logged step, plus the speed since the previous row.

    Opened after ``step`` (0: a new file), rows that a killed run logged past its last checkpoint
    are dropped first (atomically), so a resumed run never repeats a step.
    """

    def __init__(self, path: Path, step: int) -> None:
        if path.is_symlink():  # a run's files are its own: never append to a file elsewhere
            path.unlink()
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


def train_step(run: Training) -> dict[str, Any]:
    """One optimizer step on the next batch; returns the step's metrics row (JSON-able)."""
    from .loss import segment_loss
    from .on_policy import rollout_loss, teacher_share

    config = run.config
    batch = next(run.batches)
    run.stream.mark_consumed(batch)  # the data position a checkpoint records
    # the stream's items are (sample, segment) pairs: one copy to the device, none back in the loss
    batch = {k: v.to(run.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    run.optimizer.zero_grad(set_to_none=True)
    run.student.train()  # LoRA dropout acts in training steps only (the tied teacher switches itself to eval)
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=config.bf16):
        if run.on_policy is None:
            loss, per_segment = segment_loss(run.model, batch, run.num_segments)
            loss = loss * config.loss_scale
        else:  # the rollout back-propagates each segment itself (they share no gradient)
            loss, per_segment, evals = rollout_loss(run.model, *run.on_policy, batch["noise"], batch["cond"],
                                                    teacher_share(run.step, config.teacher_mix_iters), batch["generator"])
            run.stream.teacher_evals += evals * run.world_size  # every rank spends the same
    if loss.requires_grad:
        loss.backward()
    clip = config.grad_clip if run.step >= config.grad_clip_from else math.inf  # inf: the norm alone
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params.values(), clip)
    lr = run.scheduler.get_last_lr()[0]
    value = loss.item()
    stop_if_diverged(run.step + 1, value, float(grad_norm), config.lr, run.checkpointed)
    run.optimizer.step()
    run.scheduler.step()
    if run.ema is not None:
        run.ema.step(run.params.values())
    run.step += 1
    return {
        "step": run.step,
        "loss": value,
        # null where a segment was absent from the batch (NaN is not JSON)
        **{f"loss_segment_{i}": (None if v != v else v) for i, v in enumerate(per_segment.tolist())},
        "lr": lr,
        "grad_norm": float(grad_norm),
        "teacher_evals": run.teacher_evals,
        **({"teacher_share": teacher_share(run.step - 1, config.teacher_mix_iters)} if run.on_policy else {}),
    }


def stop_if_diverged(step: int, loss: float, grad_norm: float, lr: float, checkpointed: int = 0) -> None:
    """Stop a diverged run with one line naming the step, BEFORE its optimizer step touches the
    weights: the last checkpoint (step ``checkpointed``; 0: none was written) stays the last good one
    and nothing is exported. Every rank agrees (the gradients, and so their norm, are all-reduced)."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        kept = (f"the last good checkpoint (step {checkpointed}) is kept" if checkpointed
                else "it diverged before its first checkpoint, so none was written")
        raise ArcflowError(
            f"the loss is not finite at step {step} (loss {loss}, gradient norm {grad_norm}): training diverged; "
            f"{kept} and no student was exported; lower --lr (now {lr:g}) and distill into a new --out"
        )


def _gather(obj: Any, world_size: int) -> list[Any]:
    """``obj`` from every rank, in rank order."""
    if world_size == 1:
        return [obj]
    out: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def checkpoint_files(run: Training, data: list[dict[str, Any]], directory: Path) -> None:
    """Write the checkpoint of ``run`` at its current step into ``directory`` (rank 0)."""
    ema = None
    state: dict[str, Any] = {"step": run.step, "data": data, "config": run.config.to_dict()}
    if run.ema is not None:
        ema_state = run.ema.state_dict()
        ema = dict(zip(run.params, ema_state.pop("shadow_params")))
        state["ema"] = ema_state  # decay and update count (diffusers' EMAModel warms its decay up)
    write_checkpoint(directory, dict(run.params), ema, run.optimizer.state_dict(), state)


def export(run: Training, plan: RunPlan) -> None:
    """Save the student (its EMA weights, if any) as the run's diffusers-style LoRA + head files."""
    from .student import save_student

    config = run.config
    extra = {"dataset_fingerprint": plan.dataset_fingerprint, "nfe": config.student.nfe, "training": config.to_dict()}
    # what `arcflow sample` / distill.interop need to rebuild the teacher and the schedule
    extra["teacher_options"] = {k: v for k, v in plan.teacher_options.items() if k != "text_encoders"}
    extra["segment_sigmas"] = run.segment_sigmas
    extra["guidance"] = plan.guidance if plan.guidance is not None else run.student.teacher.default_guidance
    # what the run cost in teacher network evaluations (data + rollouts, parent runs included)
    extra["teacher_evals"] = run.teacher_evals
    extra["teacher_evals_own"] = run.teacher_evals - (plan.teacher_evals if config.on_policy else 0)
    run.student.eval()  # training is over: what follows (and any caller's use of the student) samples
    if run.ema is not None:
        run.ema.copy_to(run.params.values())  # the export is the average
    check_finite(dict(run.params), f"the student of {config.out} at step {run.step}")
    save_student(run.student, Path(config.out), extra_config=extra)
