"""`DistillConfig`: the one configuration object of the distill stage (CLI and Python API)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping, Optional

from arcflow.core.errors import ArcflowError, check_numbers
from arcflow.core.ray_runtime import check_local_gpus, check_local_workers

from .student.config import StudentConfig

#: Fields that may change when a run is resumed (they do not change what a step computes). A moved
#: run or dataset resumes: the data itself is compared by its fingerprint instead of its path.
RESUMABLE_CHANGES = (
    "out", "dataset", "iters", "resume", "num_workers", "use_gpu", "ray_address", "checkpoint_every", "log_every",
    "progress", "gradient_checkpointing", "fsdp", "max_failures", "threads",
)


@dataclass
class DistillConfig:
    """Everything `arcflow distill` needs; saved as ``distill_config.json`` in the run directory."""

    dataset: str
    out: str
    #: The student: K, weight groups, momentum, LoRA, what trains, and its NFE (segments). Momentum
    #: is off by default here: on the digits testbed the ablation (benchmarks/ablation.py) found K
    #: constant velocities at least as good as curved momentum steps; `--momentum` gives ArcFlow's.
    student: StudentConfig = field(default_factory=lambda: StudentConfig(momentum=False))
    iters: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.99
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

    def validate(self) -> None:
        """One-line ``ArcflowError`` for values no run can use (dataset checks happen elsewhere)."""
        check_numbers(
            self,
            positive=("iters", "batch_size", "checkpoint_every", "log_every", "num_workers"),
            non_negative=("warmup", "loader_workers", "shuffle_buffer", "weight_decay", "max_failures"),
            at_most={"iters": 10**9, "batch_size": 10**6, "num_workers": 10_000,
                     "loader_workers": 256, "shuffle_buffer": 10**6, "max_failures": 10**6},
        )
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
        if not 0.0 <= self.ema_decay < 1.0:
            raise ArcflowError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if self.fsdp and self.student.trainable == "full":
            raise ArcflowError("--fsdp shards the frozen weights; with --trainable full nothing is frozen")

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
        student.setdefault("momentum", False)  # this stage's default (see the field's comment)
        return cls(**{k: v for k, v in data.items() if k in names}, student=StudentConfig.from_dict(student))

    def differences(self, other: "DistillConfig") -> list[str]:
        """Names of fields that differ and would change what training computes."""
        mine, theirs = _flat(self.to_dict()), _flat(other.to_dict())
        return [k for k in mine if k not in RESUMABLE_CHANGES and mine[k] != theirs.get(k)]


def _flat(data: Mapping[str, Any]) -> dict[str, Any]:
    """``{"student": {"k": 8}}`` -> ``{"student.k": 8}`` (a resume names the field that differs)."""
    return {**{k: v for k, v in data.items() if k != "student"},
            **{f"student.{k}": v for k, v in data["student"].items()}}
