"""`DistillConfig`: the one configuration object of the distill stage (CLI and Python API)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Optional

from arcflow.storage.errors import ArcflowError

TRAINABLE_SETS = ("lora+heads", "heads", "full")

#: Fields that may change when a run is resumed (they do not change what a step computes).
RESUMABLE_CHANGES = (
    "iters", "resume", "num_workers", "use_gpu", "ray_address", "checkpoint_every", "log_every", "progress",
    "gradient_checkpointing", "fsdp",
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
    ray_address: Optional[str] = None
    resume: bool = False
    progress: bool = True

    def validate(self) -> None:
        """One-line ``ArcflowError`` for values no run can use (dataset checks happen elsewhere)."""
        positive = ("nfe", "k", "lora_rank", "iters", "batch_size", "checkpoint_every", "log_every", "num_workers")
        for name in positive:
            if getattr(self, name) < 1:
                raise ArcflowError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.trainable not in TRAINABLE_SETS:
            raise ArcflowError(f"--trainable must be one of {', '.join(TRAINABLE_SETS)}, got {self.trainable!r}")
        if self.lr <= 0:
            raise ArcflowError(f"--lr must be > 0, got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ArcflowError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if self.warmup < 0 or self.loader_workers < 0:
            raise ArcflowError("--warmup and --loader-workers must be >= 0")
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
