"""Exponential moving average of the trainable weights (what the exported student uses)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn


class EMA:
    """Keeps ``shadow = decay * shadow + (1 - decay) * param`` for the named trainable parameters."""

    def __init__(self, named_params: dict[str, nn.Parameter], decay: float) -> None:
        self.decay = float(decay)
        self.params = named_params
        self.shadow = {k: p.detach().clone().float() for k, p in named_params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for k, p in self.params.items():
            self.shadow[k].lerp_(p.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:3]}")
        for k in self.shadow:
            self.shadow[k].copy_(state[k])

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Temporarily swap the EMA weights into the model (for export or evaluation)."""
        backup = {k: p.detach().clone() for k, p in self.params.items()}
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(self.shadow[k].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(backup[k])
