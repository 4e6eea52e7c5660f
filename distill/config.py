"""`DistillConfig`: the one configuration object of the distill stage (CLI and Python API)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping, Optional

from arcflow.core.errors import ArcflowError, check_numbers
from arcflow.core.ray_runtime import check_local_gpus, check_local_workers

from .student.config import StudentConfig

#: Fields that may change when a run is resumed (they do not change what a step computes). A moved
#: run or dataset resumes: the data itself is compared by its fingerprint instead of its path.
RESUMABLE_CHANGES = (
    "out", "dataset", "iters", "resume", "num_workers", "use_gpu", "ray_address", "checkpoint_every", "log_every",
    "progress", "gradient_checkpointing", "fsdp", "max_failures", "threads", "preset",
)


#: Settings only an on-policy run uses (an offline run's data fixes them), and only an offline one.
ON_POLICY_FIELDS = ("teacher", "prompts", "from_run", "guidance", "teacher_options", "teacher_mix_iters",
                    "intermediate_states", "total_substeps", "window_substeps", "mixture_dropout", "plain_cfg")
OFFLINE_FIELDS = ("dataset", "shards", "shuffle_buffer", "loader_workers")

#: ``ema_schedule`` values: a fixed decay (diffusers' ``EMAModel``, which warms it up) or the
#: Karras power-function schedule of the official recipe (distill/optim.py).
EMA_SCHEDULES = ("constant", "karras")


@dataclass
class DistillConfig:
    """Everything `arcflow distill` needs; saved as ``distill_config.json`` in the run directory.

    Offline (the default) it fits the student to a trajectory ``dataset``. With ``on_policy`` there
    is no dataset: the student rolls out from noise and the teacher, tied to the student's own frozen
    base, gives the targets at the states the rollout visits (distill/on_policy.py); ``teacher``
    names it, or ``from_run`` continues a finished run (its teacher, student and weights).
    """

    dataset: Optional[str] = None
    out: str = ""
    #: The student: K, weight groups, momentum, LoRA, what trains, and its NFE (segments). Its
    #: defaults are StudentConfig's own (the one source the CLI reads as well).
    student: StudentConfig = field(default_factory=StudentConfig)
    iters: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    #: The warm-up's first LR as a fraction of ``lr`` (0: from 0, diffusers' schedule; official 0.001).
    warmup_start: float = 0.0
    weight_decay: float = 0.0
    #: AdamW's second-moment decay (the official recipe uses 0.95); beta1 is 0.9.
    adam_beta2: float = 0.999
    #: Learning-rate multiplier of the momentum head's log-gamma projection (official: 0.1).
    log_gamma_lr_mult: float = 1.0
    #: The loss is multiplied by this (the official recipe: MSE x 30); matters with --grad-clip.
    loss_scale: float = 1.0
    grad_clip: float = 1.0
    #: The gradient clip applies from this (0-based) step on (official: 100).
    grad_clip_from: int = 0
    ema_decay: float = 0.99
    #: ``constant``: ``ema_decay`` (warmed up by diffusers' EMAModel); ``karras``: the decay at step
    #: t is (1 - 1/(t - ema_start))^(ema_gamma + 1), the official recipe's schedule.
    ema_schedule: str = "constant"
    ema_gamma: float = 7.0
    ema_start: int = 100
    bf16: bool = False
    #: Recompute each transformer block's activations in backward (diffusers' checkpointing):
    #: less activation memory for about one more forward per step; same loss and gradients.
    gradient_checkpointing: bool = False
    #: Shard the frozen base weights over the workers (FSDP2; distill/parallel.py). Trainable
    #: weights stay whole on every worker, so checkpoints and the export are unchanged.
    fsdp: bool = False
    checkpoint_every: int = 500
    log_every: int = 10
    #: Seeds the data order, the segment draws and the student's initialisation (its ``init_seed``).
    seed: int = 0
    shuffle_buffer: int = 512
    #: Train on these committed shards only (None: all of them), e.g. for data-size ablations.
    shards: Optional[list[int]] = None
    loader_workers: int = 0
    num_workers: int = 1
    use_gpu: bool = False
    #: torch intra-op threads per training worker (None: torch's default for the worker's CPUs).
    threads: Optional[int] = None
    ray_address: Optional[str] = None
    #: Ray Train restarts the workers this many times after a failure, from the latest checkpoint.
    max_failures: int = 0
    resume: bool = False
    progress: bool = True
    #: The preset these settings started from (distill/presets.py), recorded for the run's reader.
    preset: Optional[str] = None
    # ----- on-policy (data-free) distillation: distill/on_policy.py --------------------------------
    on_policy: bool = False
    #: The teacher to distill on-policy (a registry id); None with ``from_run`` (its teacher).
    teacher: Optional[str] = None
    #: A text file of prompts, one per line (None: the teacher's own prompt set).
    prompts: Optional[str] = None
    #: Continue a finished run on-policy (a polish): its teacher, student settings and weights.
    from_run: Optional[str] = None
    #: The teacher's guidance for on-policy targets (None: ``from_run``'s, else the teacher's default).
    guidance: Optional[float] = None
    #: ``load_teacher`` options of an on-policy diffusers teacher (height, width, torch_dtype, ...).
    teacher_options: Optional[dict] = None
    #: The teacher's share of each segment decays linearly from 1 to 0 over these iterations.
    teacher_mix_iters: int = 2000
    #: States visited per segment (each one teacher evaluation per sample, x2 with true CFG).
    intermediate_states: int = 4
    #: Raw-time resolution of a segment and the prediction window in those sub-steps.
    total_substeps: int = 128
    window_substeps: int = 3
    #: Probability of dropping each mixture component of the detached student rollout.
    mixture_dropout: float = 0.1
    #: True CFG targets as plain ``uncond + g (cond - uncond)`` (the official code) rather than as the
    #: pipeline combines them (Qwen-Image rescales to the conditional velocity's norm per token).
    plain_cfg: bool = False

    def validate(self) -> None:
        """One-line ``ArcflowError`` for values no run can use (dataset checks happen elsewhere)."""
        check_numbers(
            self,
            positive=("iters", "batch_size", "checkpoint_every", "log_every", "num_workers", "intermediate_states",
                      "total_substeps"),
            non_negative=("warmup", "loader_workers", "shuffle_buffer", "weight_decay", "max_failures",
                          "teacher_mix_iters", "window_substeps", "ema_start", "grad_clip_from"),
            at_most={"iters": 10**9, "batch_size": 10**6, "num_workers": 10_000,
                     "loader_workers": 256, "shuffle_buffer": 10**6, "max_failures": 10**6,
                     "intermediate_states": 1000, "total_substeps": 10**6},
        )
        if not self.out:
            raise ArcflowError("--out is required: the run directory")
        self._validate_source()
        if self.threads is not None and not 1 <= self.threads <= 1024:
            raise ArcflowError(f"--threads must be from 1 to 1024, got {self.threads}")
        if "://" in str(self.out):  # pathlib would make "s3://b/run" a local "s3:/b/run"
            raise ArcflowError(
                f"--out {self.out}: the run directory (checkpoints, metrics, the exported student) must be a "
                "local path; only the dataset may be a URL such as s3://"
            )
        if not self.use_gpu:
            check_local_workers("--num-workers", self.num_workers, self.ray_address)
        elif self.ray_address is None:  # a cluster's GPUs are checked once it is reached
            check_local_gpus("--use-gpu", self.num_workers)
        if self.lr <= 0:
            raise ArcflowError(f"--lr must be > 0, got {self.lr}")
        if self.grad_clip <= 0:
            raise ArcflowError(f"--grad-clip must be > 0, got {self.grad_clip}")
        if not 0.0 <= self.warmup_start <= 1.0:
            raise ArcflowError(f"--warmup-start must be in [0, 1], got {self.warmup_start}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ArcflowError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if self.fsdp and self.student.trainable == "full":
            raise ArcflowError("--fsdp shards the frozen weights; with --trainable full nothing is frozen")
        if not 0.0 <= self.adam_beta2 < 1.0:
            raise ArcflowError(f"--adam-beta2 must be in [0, 1), got {self.adam_beta2}")
        if self.log_gamma_lr_mult < 0 or self.loss_scale <= 0:
            raise ArcflowError("--log-gamma-lr-mult must be >= 0 and --loss-scale > 0")
        if self.ema_schedule not in EMA_SCHEDULES:
            raise ArcflowError(f"--ema-schedule must be one of {', '.join(EMA_SCHEDULES)}, got {self.ema_schedule!r}")
        if self.ema_gamma <= 0:
            raise ArcflowError(f"--ema-gamma must be > 0, got {self.ema_gamma}")

    def _validate_source(self) -> None:
        """Where the training data comes from: a dataset, or (on-policy) a teacher or a finished run."""
        if not self.on_policy:
            given = [f for f, v in (("--teacher", self.teacher), ("--prompts", self.prompts), ("--from", self.from_run),
                                    ("--guidance", self.guidance), ("teacher options", self.teacher_options),
                                    ("--plain-cfg", self.plain_cfg)) if v]
            if given:
                raise ArcflowError(f"{', '.join(given)} only apply with --on-policy (offline runs take them from the dataset)")
            if not self.dataset:
                raise ArcflowError("a DATASET is required (or --on-policy with --teacher ID or --from RUN)")
            return
        if self.dataset:
            raise ArcflowError("--on-policy trains without a dataset: drop DATASET (use --teacher ID or --from RUN)")
        if self.shards is not None:
            raise ArcflowError("--on-policy has no dataset shards to select")
        if (self.teacher is None) == (self.from_run is None):
            raise ArcflowError("--on-policy needs exactly one of --teacher ID (from scratch) or --from RUN (a polish)")
        if self.fsdp:
            raise ArcflowError("--on-policy does not support --fsdp yet (the tied teacher swaps the output head in place)")
        if self.student.trainable == "full":
            raise ArcflowError("--on-policy ties the teacher to the student's frozen base; --trainable full leaves none")
        if self.guidance is not None and (not math.isfinite(self.guidance) or self.guidance < 0):
            raise ArcflowError(f"--guidance must be a finite number >= 0, got {self.guidance}")
        if not 0.0 <= self.mixture_dropout < 1.0:
            raise ArcflowError(f"--mixture-dropout must be in [0, 1), got {self.mixture_dropout}")
        if "://" in str(self.from_run or "") or "://" in str(self.prompts or ""):
            raise ArcflowError("--from and --prompts must be local paths")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DistillConfig":
        """From :meth:`to_dict`'s output, or from flat keyword settings where the student's fields sit
        beside the trainer's (what the CLI passes, and how runs saved before the nesting read)."""
        names = {f.name for f in fields(cls)} - {"student"}
        student_names = {f.name for f in fields(StudentConfig)}
        student = dict(data.get("student") or {})
        student.update({k: v for k, v in data.items() if k in student_names})
        return cls(**{k: v for k, v in data.items() if k in names}, student=StudentConfig.from_dict(student))

    def differences(self, other: "DistillConfig") -> list[str]:
        """Names of fields that differ and would change what training computes (an offline run's
        on-policy settings compute nothing: runs saved before they were refused may hold any)."""
        mine, theirs = _flat(self.to_dict()), _flat(other.to_dict())
        unused = () if self.on_policy else ON_POLICY_FIELDS
        return [k for k in mine if k not in RESUMABLE_CHANGES + unused and mine[k] != theirs.get(k)]


def _flat(data: Mapping[str, Any]) -> dict[str, Any]:
    """``{"student": {"k": 8}}`` -> ``{"student.k": 8}`` (a resume names the field that differs)."""
    return {**{k: v for k, v in data.items() if k != "student"},
            **{f"student.{k}": v for k, v in data["student"].items()}}
