"""Training checkpoints: a directory of safetensors (every tensor) and JSON (everything else).

``RUN/checkpoints/step-0000500/`` holds ``trainable.safetensors`` (the trained weights by parameter
name), ``ema.safetensors`` (their EMA, if any), ``optimizer.safetensors`` + ``optimizer.json``
(AdamW's state, flattened so that nothing is pickled) and ``state.json`` (step, every rank's data
position, the EMA's counters).

Under Ray Train, ``RUN/checkpoints`` is Ray's run directory (``RunConfig(storage_path=RUN,
name="checkpoints")``): ``ray.train.report`` persists each checkpoint there and keeps
``num_to_keep`` of them, and Ray's run snapshot lists them by name relative to that directory, so
``ray.train.get_checkpoint`` restores the latest one after a worker restart, on ``--resume``, and in
a run directory that was moved or copied. A run trained in-process without Ray Train (tests,
benchmarks: :class:`LocalCheckpoints`) writes the same directories with an atomic rename.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

from safetensors.torch import load_file, save_file
from torch import Tensor

from arcflow.core.errors import ArcflowError, first_line

log = logging.getLogger(__name__)

KEEP_CHECKPOINTS = 2
CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "state.json"
#: Where Ray Train V2 records a run's checkpoints (``ray.train.v2._internal.constants``).
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"

#: Writes a checkpoint's files into the directory it is given.
WriteFiles = Callable[[Path], None]


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def _cpu(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def write_checkpoint(
    directory: Path,
    trainable: dict[str, Tensor],
    ema: Optional[dict[str, Tensor]],
    optimizer: dict[str, Any],
    state: dict[str, Any],
) -> None:
    """Write one checkpoint's files into ``directory`` (which exists)."""
    save_file(_cpu(trainable), str(directory / "trainable.safetensors"))
    if ema is not None:
        save_file(_cpu(ema), str(directory / "ema.safetensors"))
    tensors, scalars = {}, {}
    for index, per_param in optimizer["state"].items():
        for name, value in per_param.items():
            (tensors if isinstance(value, Tensor) else scalars)[f"{index}.{name}"] = value
    save_file(_cpu(tensors), str(directory / "optimizer.safetensors"))
    (directory / "optimizer.json").write_text(json.dumps({"param_groups": optimizer["param_groups"], "scalars": scalars}))
    (directory / STATE_FILE).write_text(json.dumps(state, indent=2))


def read_checkpoint(directory: Path) -> dict[str, Any]:
    """A checkpoint's ``trainable``, ``ema`` (or None), ``optimizer`` (a state dict) and ``state``."""
    ema_file = directory / "ema.safetensors"
    meta = json.loads((directory / "optimizer.json").read_text())
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in [*load_file(str(directory / "optimizer.safetensors")).items(), *meta["scalars"].items()]:
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    return {
        "trainable": load_file(str(directory / "trainable.safetensors")),
        "ema": load_file(str(ema_file)) if ema_file.is_file() else None,
        "optimizer": {"state": per_param, "param_groups": meta["param_groups"]},
        "state": json.loads((directory / STATE_FILE).read_text()),
    }


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest checkpoint of a run, or None: Ray Train's record where Ray trained the run,
    else the newest complete ``step-*`` directory (written by :class:`LocalCheckpoints`)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if (root / RAY_SNAPSHOT).is_file():
        from ray.train import Result

        ray_log = logging.getLogger("ray.train.v2._internal.execution.checkpoint.checkpoint_manager")
        level = ray_log.level
        ray_log.setLevel(logging.WARNING)  # not its "A run snapshot was found" paragraph on every --resume
        try:
            checkpoint = Result.from_path(str(root)).checkpoint
        except Exception as exc:  # Ray's record names a deleted checkpoint, or is damaged
            reason = first_line(exc).split(". ")[0]
            raise ArcflowError(f"{root} is damaged ({reason}); resume is impossible, start a new --out") from None
        finally:
            ray_log.setLevel(level)
        return Path(checkpoint.path) if checkpoint is not None else None
    done = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())
    return done[-1] if done else None


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint was taken at (reads its small JSON only)."""
    return int(json.loads((Path(path) / STATE_FILE).read_text())["step"])


class Checkpoints(Protocol):
    """Where a worker's checkpoints go and come back from."""

    def load(self) -> Optional[dict[str, Any]]:
        """The checkpoint to continue from (a :func:`read_checkpoint` result), or None."""

    def save(self, step: int, write: Optional[WriteFiles], metrics: dict[str, Any]) -> None:
        """Checkpoint ``step``: ``write`` fills its directory (None on ranks other than 0)."""


class LocalCheckpoints:
    """Checkpoints of a run trained in this process without Ray Train: same layout, same pruning."""

    def __init__(self, run_dir: Path, resume: bool) -> None:
        self.root = Path(run_dir) / CHECKPOINTS_DIR
        self.resume = resume

    def load(self) -> Optional[dict[str, Any]]:
        """The latest checkpoint's contents when resuming, else None."""
        path = latest_checkpoint(self.root.parent) if self.resume else None
        return read_checkpoint(path) if path is not None else None

    def save(self, step: int, write: Optional[WriteFiles], metrics: dict[str, Any]) -> None:
        """Write checkpoint ``step`` into a hidden directory, rename it into place, prune old ones."""
        if write is None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        final, tmp = self.root / checkpoint_name(step), self.root / f".tmp-{checkpoint_name(step)}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(p for p in self.root.glob("step-*") if p.is_dir())[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)


class RayCheckpoints:
    """Checkpoints through Ray Train: ``ray.train.report`` persists and prunes them,
    ``ray.train.get_checkpoint`` hands the latest back (after a restart or on ``--resume``).

    ``fallback`` is the checkpoint the driver found for ``--resume`` (:func:`latest_checkpoint`),
    used only where Ray holds no record of the run: one trained in-process before.
    """

    def __init__(self, fallback: Optional[str]) -> None:
        self.fallback = fallback

    def load(self) -> Optional[dict[str, Any]]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            if self.fallback:
                log.info("resuming from %s (Ray Train holds no record of this run)", self.fallback)
            return read_checkpoint(Path(self.fallback)) if self.fallback else None
        log.info("resuming from Ray Train's checkpoint %s", checkpoint.path)
        with checkpoint.as_directory() as directory:
            return read_checkpoint(Path(directory))

    def save(self, step: int, write: Optional[WriteFiles], metrics: dict[str, Any]) -> None:
        """Every rank calls this (``report`` is a barrier); ``write`` is None except on rank 0."""
        import ray.train

        name = checkpoint_name(step)
        if write is None:
            ray.train.report(metrics, checkpoint_dir_name=name)
            return
        with tempfile.TemporaryDirectory(prefix="arcflow-checkpoint-") as tmp:
            write(Path(tmp))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
