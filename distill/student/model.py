"""The student module and how it is built from a teacher: frozen transformer + momentum head + LoRA."""

from __future__ import annotations

import copy
import functools
import logging
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from arcflow.core.errors import ArcflowError, first_line

from ..momentum import MomentumParams
from .config import ADAPTER_NAME, HeadSpec, StudentConfig, lora_config_for
from .head import PACKED_PATCH, MomentumHead, head_for

logger = logging.getLogger(__name__)

#: Attribute of a transformer whose ``out_channels`` follows its head: its latent channels (see :func:`set_head`).
_SYNC_FLAG = "_arcflow_out_channels_follow_head"


def head_spec(transformer: nn.Module) -> HeadSpec:
    """The :class:`HeadSpec` of ``transformer``'s family (pipeline/families.py); the default
    (top-level ``proj_out``, packed tokens) for transformers no family names."""
    from arcflow.pipeline.families import family_for_transformer

    family = family_for_transformer(transformer_class_name(transformer))
    if family is None:
        return HeadSpec()
    return HeadSpec(family.head_module, int(family.head_positions(transformer)), int(family.output_sign),
                    family.latent_layout == "channels_first")


def get_head(transformer: nn.Module, path: str) -> Any:
    """The module at dotted ``path`` (None where there is none)."""
    try:
        return transformer.get_submodule(path)
    except AttributeError:
        return None


def _sync_out_channels(path: str, channels: int, module: nn.Module, args: Any) -> None:
    """Forward pre-hook: the transformer un-patchifies with ``out_channels`` = its head's per-position
    width (the packed width under a momentum head, the latent channels under the projection)."""
    head = module.get_submodule(path)
    module.out_channels = head.out_features if isinstance(head, MomentumHead) else channels


def set_head(transformer: nn.Module, spec: HeadSpec, module: nn.Module) -> nn.Module:
    """Put ``module`` at ``spec.path``; returns what was there. A transformer that un-patchifies
    after its projection (``spec.unpatchifies``, or ``spec.positions > 1``) gets a pre-hook (once)
    keeping its ``out_channels`` in step with whichever module is there."""
    parent, _, leaf = spec.path.rpartition(".")
    owner = transformer.get_submodule(parent) if parent else transformer
    previous = getattr(owner, leaf)
    unpatchifies = spec.unpatchifies or spec.positions > 1
    if unpatchifies and not getattr(transformer, _SYNC_FLAG, None):
        original = previous.out_features // spec.positions
        transformer.register_forward_pre_hook(functools.partial(_sync_out_channels, spec.path, original))
        setattr(transformer, _SYNC_FLAG, original)
    setattr(owner, leaf, module)
    if unpatchifies:
        _sync_out_channels(spec.path, getattr(transformer, _SYNC_FLAG), transformer, ())
    return previous


class Student(nn.Module):
    """The few-step student. Calling it (or :meth:`predict`) gives one segment's momentum params."""

    def __init__(self, teacher: Any, transformer: nn.Module, config: StudentConfig) -> None:
        super().__init__()
        self.transformer = transformer
        self.config = config
        # Plain attribute: the teacher supplies input formatting and metadata, it is not a submodule.
        self.teacher = teacher

    @property
    def head(self) -> MomentumHead:
        return get_head(self.transformer, head_spec(self.transformer).path)

    @property
    def has_lora(self) -> bool:
        return self.config.trainable == "lora+heads"

    def forward(self, x: Tensor, sigma: Tensor, cond: Mapping[str, Tensor]) -> MomentumParams:
        """Latent tokens ``x`` ``(B, N, C)`` at per-sample ``sigma`` ``(B,)`` -> params with
        velocities ``(B, K, C, N)``, logits ``(B, K, G, N)``, log-gammas ``(B, K-1, G, N)``."""
        out = self.transformer(**self.teacher.transformer_inputs(x, sigma, cond))
        return self.head.unpack(self.teacher.network_output(out, x.shape[1]))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer updates."""
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_share(self) -> float:
        """Trainable parameters / all transformer parameters (LoRA and head included)."""
        total = sum(p.numel() for p in self.transformer.parameters())
        return sum(p.numel() for p in self.trainable_parameters()) / max(total, 1)

    def describe_trainable(self) -> str:
        """One line: trainable count, total, share, and the LoRA / head split."""
        total = sum(p.numel() for p in self.transformer.parameters())
        lora = sum(p.numel() for n, p in self.named_parameters() if p.requires_grad and ".lora_" in n)
        head = sum(p.numel() for p in self.head.parameters() if p.requires_grad)
        train = sum(p.numel() for p in self.trainable_parameters())
        return (
            f"student ({self.config.trainable}, K={self.config.k}): trainable {_count(train)} of "
            f"{_count(total)} transformer parameters ({100 * train / max(total, 1):.3f}%): "
            f"LoRA {_count(lora)}, head {_count(head)}, other {_count(train - lora - head)}"
        )


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def build_student(teacher: Any, config: StudentConfig, inplace: bool = False) -> Student:
    """Student from ``teacher`` (a :class:`~arcflow.pipeline.teacher.Teacher`) and ``config``.

    The teacher's transformer is deep-copied (``inplace=True`` adapts it in place instead, saving
    memory when the teacher is no longer needed), frozen, given the momentum head and, for
    ``trainable="lora+heads"``, fresh LoRA adapters. ``"heads"`` trains only the head, ``"full"``
    every transformer weight plus the head. Returned in eval mode (peft creates its dropout modules
    in training mode): the trainer switches to training mode itself, for its training steps only.
    """
    transformer = teacher.transformer if inplace else copy.deepcopy(teacher.transformer)
    transformer.requires_grad_(False)
    spec = head_spec(transformer)
    proj = get_head(transformer, spec.path)
    if not isinstance(proj, nn.Linear):
        raise ArcflowError(
            f"{type(transformer).__name__} has no linear '{spec.path}' output projection to replace"
        )
    channels = proj.out_features // spec.positions
    if channels % config.weight_groups:
        raise ArcflowError(
            f"weight_groups={config.weight_groups} does not divide the {channels} latent channels"
        )
    if spec.path in (config.train_modules or ()):
        raise ArcflowError(f"train_modules must not name the head ({spec.path})")
    head = head_for(proj, config.k, config.weight_groups, config.momentum, config.log_gamma_bound, spec.positions)
    patch = 1 if spec.unpatchifies or spec.positions > 1 else PACKED_PATCH  # a packed token: 2x2 pixels per channel
    head.init_from_projection(proj, generator=torch.Generator().manual_seed(config.init_seed), sign=spec.sign,
                              mode=config.head_init, patch=patch)
    set_head(transformer, spec, head)

    if config.trainable == "lora+heads":
        if not hasattr(transformer, "add_adapter"):
            raise ArcflowError(f"{type(transformer).__name__} does not support peft adapters (add_adapter)")
        try:
            transformer.add_adapter(lora_config_for(config, transformer, spec.path), adapter_name=ADAPTER_NAME)
        except ValueError as exc:  # peft's own refusals
            raise ArcflowError(f"cannot add the LoRA adapters to the {type(transformer).__name__}: {first_line(exc)}") from None
    elif config.trainable == "full":
        transformer.requires_grad_(True)
    # After add_adapter: peft marks only adapter weights trainable.
    head.requires_grad_(True)
    for name in config.train_modules or ():
        try:
            transformer.get_submodule(name).requires_grad_(True)
        except AttributeError:
            raise ArcflowError(f"train_modules: {type(transformer).__name__} has no submodule {name!r}") from None

    student = Student(teacher, transformer, config).eval()
    logger.info(student.describe_trainable())
    return student


def transformer_class_name(transformer: nn.Module) -> str:
    """The diffusers class name, also under FSDP2 (which swaps in a subclass ``FSDP<name>``)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(transformer).__mro__ if not issubclass(c, FSDPModule)).__name__
