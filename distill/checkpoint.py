"""Atomic training checkpoints: safetensors for every tensor, JSON for everything else.

Layout: ``RUN/checkpoints/step-0000500/{trainable,ema,optimizer}.safetensors + state.json``.
A checkpoint is written into a hidden temporary directory and renamed into place, so a crash
mid-write leaves the previous checkpoint intact; ``latest_checkpoint`` ignores partial ones.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

from safetensors.torch import load_file, save_file
from torch import Tensor

KEEP_CHECKPOINTS = 2
_COMPLETE = "state.json"


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for name, value in per_param.items():
            if isinstance(value, Tensor):
                tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    run_dir: Path,
    step: int,
    trainable: dict[str, Tensor],
    ema: Optional[dict[str, Tensor]],
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
) -> Path:
    """Write checkpoint ``step`` atomically and prune old ones; returns its directory."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    if ema is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
    opt_tensors, opt_meta = _flatten_optimizer(optimizer_state)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
    (tmp / _COMPLETE).write_text(json.dumps({"step": step, **state}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint of a run, or None."""
    root = Path(run_dir) / "checkpoints"
    done = sorted(p for p in root.glob("step-*") if (p / _COMPLETE).is_file())
    return done[-1] if done else None


def checkpoint_step(path: Path) -> int:
    """The step a complete checkpoint was taken at (reads its small JSON only)."""
    return int(json.loads((Path(path) / _COMPLETE).read_text())["step"])


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint back: ``trainable``, ``ema`` (or None), ``optimizer`` and ``state``."""
    path = Path(path)
    ema_file = path / "ema.safetensors"
    return {
        "trainable": load_file(str(path / "trainable.safetensors")),
        "ema": load_file(str(ema_file)) if ema_file.is_file() else None,
        "optimizer": _unflatten_optimizer(
            load_file(str(path / "optimizer.safetensors")), json.loads((path / "optimizer.json").read_text())
        ),
        "state": json.loads((path / _COMPLETE).read_text()),
    }
