"""`DistillConfig`: the one configuration object of the distill stage (CLI and Python API)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Optional

from arcflow.storage.errors import ArcflowError, check_local_workers, check_numbers

TRAINABLE_SETS = ("lora+heads", "heads", "full")

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
    nfe: int = 2
    k: int = 8
    #: Default off: on the digits testbed the ablation (benchmarks/ablation.py) found K constant
    #: velocities at least as good as curved momentum steps; `--momentum` gives ArcFlow's curves.
    momentum: bool = False
    weight_groups: int = 1
    lora_rank: int = 16
    lora_alpha: Optional[float] = None
    lora_dropout: float = 0.0
    lora_targets: Optional[list[str]] = None
    trainable: str = "lora+heads"
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
            positive=("nfe", "k", "weight_groups", "lora_rank", "iters", "batch_size", "checkpoint_every",
                      "log_every", "num_workers"),
            non_negative=("warmup", "loader_workers", "shuffle_buffer", "weight_decay", "max_failures"),
            at_most={"k": 1024, "nfe": 1000, "iters": 10**9, "batch_size": 10**6, "num_workers": 10_000,
                     "loader_workers": 256, "shuffle_buffer": 10**6, "max_failures": 10**6, "lora_rank": 65_536, "weight_groups": 65_536},
        )
        if self.threads is not None and not 1 <= self.threads <= 1024:
            raise ArcflowError(f"--threads must be from 1 to 1024, got {self.threads}")
        if not self.use_gpu:
            check_local_workers("--num-workers", self.num_workers, self.ray_address)
        if self.trainable not in TRAINABLE_SETS:
            raise ArcflowError(f"--trainable must be one of {', '.join(TRAINABLE_SETS)}, got {self.trainable!r}")
        if self.lr <= 0:
            raise ArcflowError(f"--lr must be > 0, got {self.lr}")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise ArcflowError(f"--lora-alpha must be > 0, got {self.lora_alpha}")
        if self.grad_clip <= 0:
            raise ArcflowError(f"--grad-clip must be > 0, got {self.grad_clip}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ArcflowError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ArcflowError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.fsdp and self.trainable == "full":
            raise ArcflowError("--fsdp shards the frozen weights; with --trainable full nothing is frozen")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DistillConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def differences(self, other: "DistillConfig") -> list[str]:
        """Names of fields that differ and would change what training computes."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [k for k in mine if k not in RESUMABLE_CHANGES and mine[k] != theirs[k]]
