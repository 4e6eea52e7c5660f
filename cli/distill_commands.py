"""`arcflow distill`: fit a LoRA + momentum-head student from a trajectory dataset, or on-policy.

Every default shown here is read from ``DistillConfig`` / ``StudentConfig`` (their one source); only
the flags a user actually gives are passed on, over ``--preset``'s values (distill/presets.py), so
``arcflow distill`` and ``build_config`` in Python build the same run from the same settings.
"""

from __future__ import annotations

from typing import List, Optional

import typer

from arcflow.distill.config import EMA_SCHEDULES, DistillConfig
from arcflow.distill.student.config import HEAD_INITS, LORA_INITS, TRAINABLE_MODES, StudentConfig

D, S = DistillConfig, StudentConfig

#: CLI parameter name -> DistillConfig / StudentConfig field (where they differ).
_FIELD = {"from_run": "from_run"}
#: Parameters that are not settings.
_NOT_SETTINGS = ("preset", "height", "width", "torch_dtype", "call_option")


def distill_command(
    ctx: typer.Context,
    dataset: Optional[str] = typer.Argument(None, help="Trajectory dataset written by generate-trajectories (not with --on-policy)."),
    out: str = typer.Option(..., "--out", help="Run directory: checkpoints, metrics.jsonl and the exported student."),
    preset: Optional[str] = typer.Option(
        None, "--preset",
        help="Start from a named recipe: 'official' (the ArcFlow paper's, for the teacher's family: flux, "
        "qwen-image, digits) or official-<family>. Flags given explicitly override it.",
    ),
    on_policy: bool = typer.Option(
        D.on_policy, "--on-policy",
        help="Data-free: roll the student out from noise; the teacher, tied to the student's frozen base, labels the states it visits.",
    ),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="On-policy: the teacher to distill (digits, a hub id or a pipeline directory)."),
    prompts: Optional[str] = typer.Option(None, "--prompts", help="On-policy: a prompts file, one per line or JSON Lines (default: the teacher's own set)."),
    from_run: Optional[str] = typer.Option(
        None, "--from", help="On-policy polish: continue this finished run (its teacher, student and weights)."
    ),
    guidance: Optional[float] = typer.Option(
        None, "--guidance", help="On-policy: the teacher's guidance (default: --from's, else the teacher's)."
    ),
    teacher_mix_iters: int = typer.Option(
        D.teacher_mix_iters, "--teacher-mix-iters", help="On-policy: the teacher's share of each segment decays 1 -> 0 over these iterations."
    ),
    intermediate_states: int = typer.Option(D.intermediate_states, "--intermediate-states", help="On-policy: states labelled per segment."),
    mixture_dropout: float = typer.Option(D.mixture_dropout, "--mixture-dropout", help="On-policy: dropout on the rollout's mixture components."),
    window_substeps: int = typer.Option(D.window_substeps, "--window-substeps", help="On-policy: prediction window, in raw sub-steps."),
    total_substeps: int = typer.Option(D.total_substeps, "--total-substeps", help="On-policy: raw sub-steps per unit of time."),
    plain_cfg: bool = typer.Option(
        D.plain_cfg, "--plain-cfg/--pipeline-cfg",
        help="On-policy true-CFG targets: uncond + g (cond - uncond) (--plain-cfg, official) or as the pipeline combines them (Qwen-Image: norm-rescaled).",
    ),
    height: Optional[int] = typer.Option(None, "--height", help="On-policy diffusers teacher: image height."),
    width: Optional[int] = typer.Option(None, "--width", help="On-policy diffusers teacher: image width."),
    torch_dtype: Optional[str] = typer.Option(None, "--torch-dtype", help="On-policy diffusers teacher: weights dtype (bfloat16, ...)."),
    call_option: Optional[List[str]] = typer.Option(
        None, "--call-option", help="On-policy diffusers teacher: KEY=VALUE (repeatable), a further __call__ argument, VALUE as JSON."
    ),
    nfe: int = typer.Option(S.nfe, "--nfe", help="Network evaluations (segments) of the student: equal raw-time segments, anywhere on the recorded schedule."),
    k: int = typer.Option(S.k, "--k", help="Momentum components per token (1 = linear-shortcut baseline)."),
    momentum: bool = typer.Option(
        S.momentum, "--momentum/--no-momentum",
        help="Curved ArcFlow momentum steps (--momentum) or K constant velocities (--no-momentum).",
    ),
    weight_groups: int = typer.Option(S.weight_groups, "--weight-groups", help="Channel groups that share one mixture weight per token."),
    lora_rank: int = typer.Option(S.lora_rank, "--lora-rank", help="LoRA rank."),
    lora_alpha: Optional[float] = typer.Option(None, "--lora-alpha", help="LoRA alpha (default: the rank)."),
    lora_dropout: float = typer.Option(S.lora_dropout, "--lora-dropout", help="LoRA dropout."),
    lora_targets: Optional[str] = typer.Option(
        None, "--lora-targets",
        help="Modules the LoRA adapts: a regex full-matched against module names (default: the teacher family's, see README).",
    ),
    log_gamma_bound: float = typer.Option(
        S.log_gamma_bound, "--log-gamma-bound", help="Soft bound on |log gamma| of the momentum components (with --momentum; 0: none)."
    ),
    head_init: str = typer.Option(
        S.head_init, "--head-init",
        help=f"Momentum head init: {'|'.join(HEAD_INITS)} (relative: component 0 exact; official: N(0, 0.05^2) on every component's bias).",
    ),
    lora_init: str = typer.Option(S.lora_init, "--lora-init", help=f"LoRA A init: {'|'.join(LORA_INITS)} (B starts at 0)."),
    trainable: str = typer.Option(S.trainable, "--trainable", help=f"What trains: {'|'.join(TRAINABLE_MODES)}."),
    iters: int = typer.Option(D.iters, "--iters", help="Optimizer steps."),
    batch_size: int = typer.Option(D.batch_size, "--batch-size", help="Items per step and worker: (sample, segment) pairs offline, rollouts on-policy."),
    lr: float = typer.Option(D.lr, "--lr", help="AdamW learning rate (after warm-up)."),
    adam_beta2: float = typer.Option(D.adam_beta2, "--adam-beta2", help="AdamW beta2."),
    log_gamma_lr_mult: float = typer.Option(D.log_gamma_lr_mult, "--log-gamma-lr-mult", help="LR multiplier of the head's log-gamma projection."),
    loss_scale: float = typer.Option(D.loss_scale, "--loss-scale", help="Multiply the loss by this."),
    warmup: int = typer.Option(D.warmup, "--warmup", help="Warm-up steps: the LR rises linearly from --warmup-start x --lr."),
    warmup_start: float = typer.Option(D.warmup_start, "--warmup-start", help="The warm-up's first LR as a fraction of --lr."),
    weight_decay: float = typer.Option(D.weight_decay, "--weight-decay", help="AdamW weight decay."),
    ema_decay: float = typer.Option(D.ema_decay, "--ema-decay", help="EMA decay of trainable weights, reached after a warm-up (diffusers' EMAModel; 0 disables); the export uses the EMA."),
    ema_schedule: str = typer.Option(D.ema_schedule, "--ema-schedule", help=f"EMA schedule: {'|'.join(EMA_SCHEDULES)} (karras: the official power-function schedule)."),
    grad_clip: float = typer.Option(D.grad_clip, "--grad-clip", help="Gradient-norm clip."),
    grad_clip_from: int = typer.Option(D.grad_clip_from, "--grad-clip-from", help="The clip applies from this (0-based) step on."),
    bf16: bool = typer.Option(D.bf16, "--bf16", help="bf16 autocast for the network (the integral stays float32)."),
    gradient_checkpointing: bool = typer.Option(
        D.gradient_checkpointing, "--gradient-checkpointing",
        help="Recompute block activations in backward: less memory, ~1 extra forward per step, same numbers.",
    ),
    fsdp: bool = typer.Option(
        D.fsdp, "--fsdp",
        help="Shard the frozen teacher weights over the --num-workers workers (FSDP2); LoRA/head stay replicated. "
        "Allowed with one worker (nothing to shard then). Not with --trainable full or --on-policy.",
    ),
    checkpoint_every: int = typer.Option(D.checkpoint_every, "--checkpoint-every", help="Steps between checkpoints."),
    seed: int = typer.Option(D.seed, "--seed", help="Seed for initialization, data order and segment draws (on-policy: noise and prompts)."),
    loader_workers: int = typer.Option(D.loader_workers, "--loader-workers", help="DataLoader worker processes per training worker."),
    num_workers: int = typer.Option(D.num_workers, "--num-workers", help="Ray Train workers (DDP, or FSDP with --fsdp)."),
    use_gpu: bool = typer.Option(D.use_gpu, "--use-gpu", help="One GPU per Ray Train worker."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch intra-op threads per training worker (default: its CPUs)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Join this Ray cluster instead of starting a local one."),
    max_failures: int = typer.Option(
        D.max_failures, "--max-failures", help="Restart the Ray Train workers up to N times after a failure, from the latest checkpoint."
    ),
    resume: bool = typer.Option(D.resume, "--resume", help="Continue the run in --out from its latest checkpoint."),
    progress: bool = typer.Option(D.progress, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Distill a few-step ArcFlow student: offline from stored teacher trajectories (the teacher never
    runs), or --on-policy from prompts alone (--teacher ID) or as a polish of a finished run (--from RUN)."""
    from arcflow.distill.presets import build_config
    from arcflow.distill.trainer import distill

    config = build_config(explicit_settings(ctx), preset)
    run = distill(config)
    typer.echo(f"student written to {run}")


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the command line set ``name`` (by its source's name: typer may carry its own click)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def explicit_settings(ctx: typer.Context) -> dict[str, object]:
    """The settings a user gave on the command line (defaults are the dataclasses' own)."""
    given = {
        _FIELD.get(name, name): value
        for name, value in ctx.params.items()
        if name not in _NOT_SETTINGS and _given(ctx, name)
    }
    from .dataset_commands import parse_call_options

    options = {name: ctx.params[name] for name in ("height", "width", "torch_dtype") if ctx.params.get(name) is not None}
    if ctx.params.get("call_option"):
        options["call_options"] = parse_call_options(ctx.params["call_option"])
    if options:
        given["teacher_options"] = options
    return given
