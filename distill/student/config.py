"""The student's configuration: K, weight groups, momentum, LoRA, what trains. Defaults live here only."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

from arcflow.core.errors import ArcflowError, check_numbers, quote

if TYPE_CHECKING:  # torch and peft load lazily: the CLI reads this config before any model exists
    from peft import LoraConfig
    from torch import nn

TRAINABLE_MODES = ("lora+heads", "heads", "full")
#: ``head_init`` values (:meth:`~arcflow.distill.student.head.MomentumHead.init_from_projection`).
HEAD_INITS = ("relative", "official")
#: ``lora_init`` values: peft's default (Kaiming-uniform A) or ``gaussian`` (A ~ N(0, 1/r^2)); B is 0.
LORA_INITS = ("kaiming", "gaussian")
#: Name of the peft adapter the student trains.
ADAPTER_NAME = "arcflow"
#: The transformer attribute holding the output projection that the momentum head replaces (the
#: default; a family may name another module, :func:`head_spec`).
HEAD_ATTRIBUTE = "proj_out"


@dataclass(frozen=True)
class HeadSpec:
    """Where a transformer's momentum head goes and how it is shaped.

    ``path``: dotted module path of the output projection it replaces; ``positions``: output
    positions per token the projection covers (``p*p`` where the transformer un-patchifies after
    it, with its ``out_channels``; 1 where it returns packed tokens); ``sign``: +1, or -1 where the
    pipeline's velocity is the negated transformer output (the head predicts the velocity);
    ``unpatchifies``: the transformer reshapes the projection's output with its ``out_channels``
    (channels-first families, whatever ``p``: SD3 with patch size 1 too).
    """

    path: str = HEAD_ATTRIBUTE
    positions: int = 1
    sign: int = 1
    unpatchifies: bool = False


@dataclass
class StudentConfig:
    """Everything that determines a student's architecture and which weights train.

    ``lora_targets``: a peft ``target_modules`` value (a regex string full-matched against module
    names, or a list of module-name suffixes); None picks the transformer family's default.
    ``lora_alpha``: None means equal to ``lora_rank``. ``momentum=False`` fixes every log-gamma at 0
    (the no-momentum control). ``nfe`` is the number of segments the student is trained for.
    ``train_modules``: transformer submodules (by name, e.g. ``["norm_out"]``) trained outright
    besides the LoRA and the head (the official recipe trains ``norm_out``). ``head_init``:
    ``relative`` (component 0 exact, 1e-3-relative noise on the others) or ``official`` (N(0, 0.05^2)
    on every component's bias, as the official code). ``lora_init``: one of :data:`LORA_INITS`.
    ``log_gamma_bound``: soft bound on |log gamma| (0: none, as the official code).

    These defaults are the ONE source: ``DistillConfig()`` and ``arcflow distill`` build this same
    student when no flag says otherwise. Momentum is off by default: in benchmarks/method_comparison.py
    (offline and on-policy, two guidance regimes) ArcFlow's curved steps never beat K constant
    velocities on the digits teacher; ``momentum=True`` gives ArcFlow's.
    """

    k: int = 8
    weight_groups: int = 1
    momentum: bool = False
    lora_rank: int = 16
    lora_alpha: Optional[float] = None
    lora_dropout: float = 0.0
    lora_targets: Optional[Union[str, list[str]]] = None
    train_modules: Optional[list[str]] = None
    trainable: str = "lora+heads"
    log_gamma_bound: float = 6.0
    head_init: str = "relative"
    lora_init: str = "kaiming"
    nfe: int = 2
    init_seed: int = 0

    def __post_init__(self) -> None:
        if self.lora_alpha is None:
            self.lora_alpha = float(self.lora_rank)
        if isinstance(self.lora_targets, tuple):
            self.lora_targets = list(self.lora_targets)
        check_lora_targets(self.lora_targets)
        if self.train_modules is not None:
            self.train_modules = [str(m) for m in self.train_modules]
            if any(m == HEAD_ATTRIBUTE or not m for m in self.train_modules):
                raise ArcflowError(f"train_modules must name transformer submodules other than the head, got {self.train_modules}")
        check_numbers(self, positive=("k", "weight_groups", "nfe"),
                      at_most={"k": 1024, "nfe": 1000, "lora_rank": 65_536, "weight_groups": 65_536})
        if self.trainable not in TRAINABLE_MODES:
            raise ArcflowError(f"--trainable must be one of {', '.join(TRAINABLE_MODES)}, got {self.trainable!r}")
        if self.trainable == "lora+heads" and self.lora_rank < 1:
            raise ArcflowError(f"--lora-rank must be >= 1, got {self.lora_rank}")
        if self.trainable == "lora+heads" and not self.lora_alpha > 0:
            raise ArcflowError(f"--lora-alpha must be > 0, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ArcflowError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.log_gamma_bound >= 0:
            raise ArcflowError(f"--log-gamma-bound must be >= 0 (0: none), got {self.log_gamma_bound}")
        if self.head_init not in HEAD_INITS:
            raise ArcflowError(f"--head-init must be one of {', '.join(HEAD_INITS)}, got {self.head_init!r}")
        if self.lora_init not in LORA_INITS:
            raise ArcflowError(f"--lora-init must be one of {', '.join(LORA_INITS)}, got {self.lora_init!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict (inverse of :meth:`from_dict`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StudentConfig":
        """Rebuild from :meth:`to_dict`'s output; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ArcflowError(f"unknown student config keys: {', '.join(unknown)}")
        return cls(**dict(data))


def check_lora_targets(targets: Optional[Union[str, list[str]]]) -> None:
    """``--lora-targets``: a regular expression that compiles, or a list of module-name suffixes."""
    if targets is None:
        return
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as exc:
            raise ArcflowError(f"--lora-targets {quote(targets)} is not a regular expression ({exc.msg} at position {exc.pos})") from None
        return
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise ArcflowError(f"lora_targets must be a regex or a list of module names, got {quote(targets)}")


def lora_target_names(targets: Union[str, list[str]], transformer: nn.Module, head_path: str) -> list[str]:
    """The modules of ``transformer`` the LoRA adapts: the linear layers ``targets`` names (a regex
    full-matched against module names, or module-name suffixes, as peft reads them), the output
    projection ``head_path`` (the momentum head's) excluded. One line when that leaves none."""
    import torch

    def named(name: str) -> bool:
        if isinstance(targets, str):
            return re.fullmatch(targets, name) is not None
        return any(name == t or name.endswith(f".{t}") for t in targets)

    def in_head(name: str) -> bool:
        return name == head_path or name.startswith(f"{head_path}.")

    matched = {n: m for n, m in transformer.named_modules() if n and named(n)}
    names = [n for n, m in matched.items() if isinstance(m, torch.nn.Linear) and not in_head(n)]
    if names:
        return names
    flag = f"--lora-targets {quote(targets if isinstance(targets, str) else ','.join(targets))}"
    what = type(transformer).__name__
    if not matched:
        raise ArcflowError(f"{flag} match no module of the {what}")
    if all(in_head(n) for n in matched):
        raise ArcflowError(f"{flag} match only the output projection {head_path}, which the momentum head replaces")
    kinds = sorted({type(m).__name__ for n, m in matched.items() if not in_head(n)})
    raise ArcflowError(f"{flag} match no linear layer of the {what} (only {', '.join(kinds)}); LoRA adapts linear layers")


def default_lora_targets(transformer: nn.Module) -> str:
    """The default LoRA target regex of ``transformer``'s family (pipeline/families.py)."""
    from arcflow.pipeline.families import lora_targets_for

    name = type(transformer).__name__
    targets = lora_targets_for(name)
    if targets is None:
        raise ArcflowError(f"no default LoRA targets for {name}; set lora_targets (--lora-targets)")
    return targets


def lora_config_for(config: StudentConfig, transformer: nn.Module, head_path: str = HEAD_ATTRIBUTE) -> LoraConfig:
    """The peft ``LoraConfig`` a student config implies for ``transformer`` (whose momentum head
    sits at ``head_path``): its targets resolved to module names (:func:`lora_target_names`)."""
    from peft import LoraConfig

    targets = config.lora_targets if config.lora_targets is not None else default_lora_targets(transformer)
    return LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=lora_target_names(targets, transformer, head_path),
        init_lora_weights=True if config.lora_init == "kaiming" else config.lora_init,
    )


