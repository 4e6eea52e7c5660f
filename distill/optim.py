"""The optimizer and the weight average a run trains with, built from its ``DistillConfig``.

* AdamW with betas ``(0.9, adam_beta2)``; the momentum head's log-gamma projection in a group of its
  own at ``lr * log_gamma_lr_mult`` (the official recipe: 0.1x);
* the learning rate: a linear warm-up over ``warmup`` steps from ``warmup_start x lr`` (0: diffusers'
  constant schedule with warm-up; the official 0.001 is mmcv's ``warmup_ratio``), then constant;
* the EMA of the trainable weights: diffusers' ``EMAModel`` with a fixed decay (``constant``), or the
  Karras power-function schedule of the official recipe (``karras``): at step t the decay is
  ``(1 - 1/(t - start))^(gamma + 1)`` (the average over roughly the last ``1/(gamma + 1)`` of the
  steps so far), 0 (a plain copy) until ``start``.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Iterable, Mapping, Optional

import torch
from torch import nn

if TYPE_CHECKING:
    from diffusers.training_utils import EMAModel

    from .config import DistillConfig

#: Name fragment of the head's log-gamma projection parameters (``proj_out.log_gamma.weight``, or
#: under another family's head module, e.g. ``all_final_layer.2-1.linear.log_gamma.weight``).
LOG_GAMMA_PARAMS = ".log_gamma."


def make_optimizer(params: Mapping[str, nn.Parameter], config: DistillConfig) -> torch.optim.AdamW:
    """AdamW over ``params`` (by name): one group, or two when the log-gamma LR differs."""
    betas = (0.9, config.adam_beta2)
    log_gamma = [p for n, p in params.items() if LOG_GAMMA_PARAMS in n]
    if config.log_gamma_lr_mult == 1.0 or not log_gamma:
        return torch.optim.AdamW(params.values(), lr=config.lr, betas=betas, weight_decay=config.weight_decay)
    rest = [p for n, p in params.items() if LOG_GAMMA_PARAMS not in n]
    groups = [{"params": rest}, {"params": log_gamma, "lr": config.lr * config.log_gamma_lr_mult}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=betas, weight_decay=config.weight_decay)


def lr_factor(step: int, warmup: int, start: float) -> float:
    """The LR of optimizer step ``step`` (0-based) as a fraction of ``lr``."""
    if step >= warmup:
        return 1.0
    return start + (1.0 - start) * step / warmup


def make_scheduler(optimizer: torch.optim.Optimizer, config: DistillConfig, step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """The run's LR schedule, positioned at ``step`` (a function of the step alone, so a resumed run
    may extend ``iters``)."""
    factor = functools.partial(lr_factor, warmup=config.warmup, start=config.warmup_start)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=step - 1)


def karras_decay(step: int, gamma: float, start: int) -> float:
    """The official recipe's EMA decay after optimizer step ``step`` (1-based)."""
    t = max(step - start, 1)
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def make_ema(params: Iterable[nn.Parameter], config: DistillConfig) -> Optional[EMAModel]:
    """The run's EMA (None with ``ema_decay == 0`` and the constant schedule)."""
    from diffusers.training_utils import EMAModel

    if config.ema_schedule == "karras":
        gamma, start = config.ema_gamma, config.ema_start

        class KarrasEMA(EMAModel):
            def get_decay(self, optimization_step: int) -> float:
                return karras_decay(optimization_step, gamma, start)

        ema: EMAModel = KarrasEMA(params)
    elif config.ema_decay > 0:
        ema = EMAModel(params, decay=config.ema_decay)
    else:
        return None
    ema.to(dtype=torch.float32)  # bf16 weights: average in float32 so small updates are not lost
    return ema
