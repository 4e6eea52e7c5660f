"""`arcflow distill`: fit a LoRA + momentum-head student from a trajectory dataset."""

from __future__ import annotations

from typing import Optional

import typer

from arcflow.distill.config import DistillConfig
from arcflow.distill.student.config import TRAINABLE_MODES, StudentConfig


def distill_command(
    dataset: str = typer.Argument(..., help="Trajectory dataset written by generate-trajectories."),
    out: str = typer.Option(..., "--out", help="Run directory: checkpoints, metrics.jsonl and the exported student."),
    nfe: int = typer.Option(StudentConfig.nfe, "--nfe", help="Network evaluations (segments) of the student: equal raw-time segments, anywhere on the recorded schedule."),
    k: int = typer.Option(StudentConfig.k, "--k", help="Momentum components per token (1 = linear-shortcut baseline)."),
    momentum: bool = typer.Option(
        False, "--momentum/--no-momentum",
        help="Curved ArcFlow momentum steps (--momentum) or K constant velocities (default: the ablation's pick on digits).",
    ),
    weight_groups: int = typer.Option(StudentConfig.weight_groups, "--weight-groups", help="Channel groups that share one mixture weight per token."),
    lora_rank: int = typer.Option(StudentConfig.lora_rank, "--lora-rank", help="LoRA rank."),
    lora_alpha: Optional[float] = typer.Option(None, "--lora-alpha", help="LoRA alpha (default: the rank)."),
    log_gamma_bound: float = typer.Option(
        StudentConfig.log_gamma_bound, "--log-gamma-bound", help="Soft bound on |log gamma| of the momentum components (with --momentum)."
    ),
    trainable: str = typer.Option(StudentConfig.trainable, "--trainable", help=f"What trains: {'|'.join(TRAINABLE_MODES)}."),
    iters: int = typer.Option(2000, "--iters", help="Optimizer steps."),
    batch_size: int = typer.Option(64, "--batch-size", help="(sample, segment) pairs per step and worker."),
    lr: float = typer.Option(1e-3, "--lr", help="AdamW learning rate (after warm-up)."),
    warmup: int = typer.Option(100, "--warmup", help="Warm-up steps: the LR rises linearly from 0 (diffusers' constant schedule with warm-up)."),
    ema_decay: float = typer.Option(0.99, "--ema-decay", help="EMA decay of trainable weights, reached after a warm-up (diffusers' EMAModel; 0 disables); the export uses the EMA."),
    grad_clip: float = typer.Option(1.0, "--grad-clip", help="Gradient-norm clip."),
    bf16: bool = typer.Option(False, "--bf16", help="bf16 autocast for the network (the integral stays float32)."),
    gradient_checkpointing: bool = typer.Option(
        False, "--gradient-checkpointing",
        help="Recompute block activations in backward: less memory, ~1 extra forward per step, same numbers.",
    ),
    fsdp: bool = typer.Option(
        False, "--fsdp",
        help="Shard the frozen teacher weights over the --num-workers workers (FSDP2); LoRA/head stay replicated. "
        "Allowed with one worker (nothing to shard then). Not with --trainable full.",
    ),
    checkpoint_every: int = typer.Option(500, "--checkpoint-every", help="Steps between checkpoints."),
    seed: int = typer.Option(0, "--seed", help="Seed for initialization, data order and segment draws."),
    loader_workers: int = typer.Option(0, "--loader-workers", help="DataLoader worker processes per training worker."),
    num_workers: int = typer.Option(1, "--num-workers", help="Ray Train workers (DDP, or FSDP with --fsdp)."),
    use_gpu: bool = typer.Option(False, "--use-gpu", help="One GPU per Ray Train worker."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch intra-op threads per training worker (default: its CPUs)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Join this Ray cluster instead of starting a local one."),
    max_failures: int = typer.Option(
        0, "--max-failures", help="Restart the Ray Train workers up to N times after a failure, from the latest checkpoint."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its latest checkpoint."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Distill a few-step ArcFlow student from stored teacher trajectories (the teacher never runs)."""
    from arcflow.distill.trainer import distill

    student = StudentConfig(
        nfe=nfe, k=k, momentum=momentum, weight_groups=weight_groups, lora_rank=lora_rank, lora_alpha=lora_alpha,
        trainable=trainable, log_gamma_bound=log_gamma_bound,
    )
    config = DistillConfig(
        dataset=dataset, out=out, student=student, iters=iters, batch_size=batch_size,
        lr=lr, warmup=warmup, ema_decay=ema_decay, grad_clip=grad_clip, bf16=bf16,
        gradient_checkpointing=gradient_checkpointing, fsdp=fsdp,
        checkpoint_every=checkpoint_every, seed=seed, loader_workers=loader_workers, num_workers=num_workers,
        use_gpu=use_gpu, ray_address=ray_address, threads=threads, max_failures=max_failures, resume=resume, progress=progress,
    )
    run = distill(config)
    typer.echo(f"student written to {run}")
