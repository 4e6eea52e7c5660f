"""Training checkpoints: a directory of safetensors (every tensor) and JSON (everything else).

``RUN/checkpoints/step-0000500/`` holds ``trainable.safetensors`` (the trained weights by parameter
name), ``ema.safetensors`` (their EMA, if any), ``optimizer.safetensors`` + ``optimizer.json``
(AdamW's state, flattened so that nothing is pickled), ``state.json`` (step, every rank's data
position, the EMA's counters) and, written last, ``manifest.json`` (each file's size and sha256).

A checkpoint is written into a hidden directory, flushed to disk, checked against its manifest and
only then renamed into place, so a torn one is never visible under its name; one that is damaged
later (or was torn by an earlier arcflow) fails its manifest and is skipped: :func:`find_checkpoint`
returns the newest INTACT one. A run directory is untrusted input: only real directories named
``step-NNNNNNN`` directly inside ``RUN/checkpoints`` are read or pruned, never a link, and no file
of a checkpoint may be a link. Ray Train only carries metrics (``ray.train.report``), never a
checkpoint: it neither restores nor deletes anything, and the driver removes the record of an
earlier job (:func:`forget_ray_record`) so Ray never acts on a path that file names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import torch
from safetensors.torch import load
from torch import Tensor

from arcflow.core.errors import ArcflowError, first_line
from arcflow.core.files import canonical_safetensors

log = logging.getLogger(__name__)

KEEP_CHECKPOINTS = 2
CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
#: Where Ray Train V2 records a run's checkpoints (``ray.train.v2._internal.constants``).
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
#: A checkpoint directory's name; nothing else under ``RUN/checkpoints`` is ever read or pruned.
CHECKPOINT_NAME = re.compile(r"step-(\d{7,})")
TMP_PREFIX = ".tmp-"

#: Writes a checkpoint's files into the directory it is given.
WriteFiles = Callable[[Path], None]


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def _cpu(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def check_finite(tensors: dict[str, Tensor], what: str) -> None:
    """Refuse weights holding NaN or infinity (a diverged run) as one line naming ``what``."""
    for name, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ArcflowError(f"{what}: weight {name[:100]} is not finite; nothing non-finite is ever saved")


def write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and flush it to disk; an OSError (a full disk) names ``path``."""
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def _save(tensors: dict[str, Tensor]) -> bytes:
    """safetensors bytes, the same for the same tensors in any process."""
    from safetensors.torch import save

    return canonical_safetensors(save(tensors))


def write_checkpoint(
    directory: Path,
    trainable: dict[str, Tensor],
    ema: Optional[dict[str, Tensor]],
    optimizer: dict[str, Any],
    state: dict[str, Any],
) -> None:
    """Write one checkpoint's files, then its manifest, into ``directory`` (which exists)."""
    check_finite(trainable, f"checkpoint at step {state.get('step')}")
    files = {"trainable.safetensors": _save(_cpu(trainable))}
    if ema is not None:
        check_finite(ema, f"checkpoint at step {state.get('step')} (EMA)")
        files["ema.safetensors"] = _save(_cpu(ema))
    tensors, scalars = {}, {}
    for index, per_param in optimizer["state"].items():
        for name, value in per_param.items():
            (tensors if isinstance(value, Tensor) else scalars)[f"{index}.{name}"] = value
    files["optimizer.safetensors"] = _save(_cpu(tensors))
    files["optimizer.json"] = json.dumps({"param_groups": optimizer["param_groups"], "scalars": scalars}).encode()
    files[STATE_FILE] = json.dumps(state, indent=2).encode()
    for name, data in files.items():
        write_file(directory / name, data)
    manifest = {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in files.items()}
    write_file(directory / MANIFEST_FILE, json.dumps({"files": manifest}, indent=2).encode())


class DamagedCheckpoint(ArcflowError):
    """A checkpoint that fails its manifest or cannot be read: the message names the file."""


def _read_member(directory: Path, name: str) -> bytes:
    """A checkpoint file's bytes: a regular file directly in ``directory``, never a link."""
    path = directory / name
    if os.sep in name or name in ("", ".", "..") or (os.altsep and os.altsep in name):
        raise DamagedCheckpoint(f"{directory / MANIFEST_FILE} names {name[:100]!r}, which is not a file of it")
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        raise DamagedCheckpoint(f"{path} is missing") from None
    if not stat.S_ISREG(mode):
        raise DamagedCheckpoint(f"{path} is not a regular file (a link or a directory)")
    return path.read_bytes()


def verify_checkpoint(directory: Path) -> None:
    """Raise :class:`DamagedCheckpoint` naming the file unless every file the manifest lists has
    its size and sha256. A checkpoint without a manifest (written by an earlier arcflow) passes
    when every file reads (:func:`read_checkpoint`)."""
    manifest_path = directory / MANIFEST_FILE
    if not os.path.lexists(manifest_path):
        read_checkpoint(directory)
        return
    try:
        listed = json.loads(_read_member(directory, MANIFEST_FILE))["files"]
        entries = [(str(name), int(entry["size"]), str(entry["sha256"])) for name, entry in listed.items()]
    except DamagedCheckpoint:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise DamagedCheckpoint(f"{manifest_path} is damaged ({first_line(exc, 100)})") from None
    if STATE_FILE not in listed:
        raise DamagedCheckpoint(f"{manifest_path} is damaged (it lists no {STATE_FILE})")
    for name, size, digest in entries:
        data = _read_member(directory, name)
        if len(data) != size:
            raise DamagedCheckpoint(f"{directory / name} is damaged ({len(data)} of {size} bytes)")
        if hashlib.sha256(data).hexdigest() != digest:
            raise DamagedCheckpoint(f"{directory / name} is damaged (its content differs from {MANIFEST_FILE})")


def read_checkpoint(directory: Path) -> dict[str, Any]:
    """A checkpoint's ``trainable``, ``ema`` (or None), ``optimizer`` (a state dict) and ``state``;
    :class:`DamagedCheckpoint` naming the file that does not read."""
    def member(name: str, parse: Callable[[bytes], Any]) -> Any:
        data = _read_member(directory, name)
        try:
            return parse(data)
        except Exception as exc:  # safetensors' or json's error about the bytes
            raise DamagedCheckpoint(f"{directory / name} is damaged ({first_line(exc, 100)})") from None

    meta = member("optimizer.json", json.loads)
    per_param: dict[int, dict[str, Any]] = {}
    try:
        for key, value in [*member("optimizer.safetensors", load).items(), *meta["scalars"].items()]:
            index, name = key.split(".", 1)
            per_param.setdefault(int(index), {})[name] = value
        optimizer = {"state": per_param, "param_groups": meta["param_groups"]}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DamagedCheckpoint(f"{directory / 'optimizer.json'} is damaged ({first_line(exc, 100)})") from None
    state = member(STATE_FILE, json.loads)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or not isinstance(state.get("data"), list):
        raise DamagedCheckpoint(f"{directory / STATE_FILE} is damaged (no step and data positions)")
    return {
        "trainable": member("trainable.safetensors", load),
        "ema": member("ema.safetensors", load) if os.path.lexists(directory / "ema.safetensors") else None,
        "optimizer": optimizer,
        "state": state,
    }


def checkpoints_root(run_dir: Path) -> Path:
    """``RUN/checkpoints``, refused as one line where it is anything but a real directory (or absent)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if root.is_symlink() or (root.exists() and not root.is_dir()):
        raise ArcflowError(f"{root} is not a directory of this run (a link or a file); remove it or choose another --out")
    return root


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every real ``step-NNNNNNN`` directory directly in ``root``, newest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = CHECKPOINT_NAME.fullmatch(path.name)
        if match and not path.is_symlink() and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


@dataclass(frozen=True)
class Found:
    """The newest intact checkpoint of a run (None: none) and the newer ones skipped as damaged."""

    path: Optional[Path]
    step: int
    damaged: list[str]

    def describe(self) -> str:
        """One line for the log: where training continues and why newer checkpoints were skipped."""
        where = f"resuming from step {self.step}" if self.path is not None else "no intact checkpoint, starting afresh"
        return "; ".join([where, *self.damaged])


def _check_one(step: int, path: Path) -> None:
    verify_checkpoint(path)
    saved = json.loads((path / STATE_FILE).read_bytes())
    if not isinstance(saved, dict) or saved.get("step") != step:
        raise DamagedCheckpoint(f"{path / STATE_FILE} is damaged (its step is not {step})")


def find_checkpoint(run_dir: Path) -> Found:
    """The newest intact checkpoint of a run: a real ``step-*`` directory inside ``RUN/checkpoints``
    whose files match their manifest and whose ``state.json`` names its step."""
    damaged = []
    for step, path in _step_dirs(checkpoints_root(Path(run_dir))):
        try:
            _check_one(step, path)
        except (DamagedCheckpoint, ValueError, OSError) as exc:
            reason = str(exc) if isinstance(exc, DamagedCheckpoint) else f"{path} is damaged ({first_line(exc, 100)})"
            damaged.append(f"step {step} is damaged: {reason}")
            continue
        return Found(path, step, damaged)
    return Found(None, 0, damaged)


def prune(root: Path, keep: int = KEEP_CHECKPOINTS) -> None:
    """Keep the ``keep`` newest intact checkpoints; remove older (or damaged older) ``step-*``
    directories and leftover hidden temp directories. Only real directories directly in ``root``."""
    kept = 0
    for step, path in _step_dirs(root):
        if kept >= keep:
            shutil.rmtree(path, ignore_errors=True)
            continue
        try:
            _check_one(step, path)
            kept += 1
        except (DamagedCheckpoint, ValueError, OSError):
            if kept:  # damaged and older than an intact one: worthless
                shutil.rmtree(path, ignore_errors=True)
    for path in root.iterdir():
        if path.name.startswith(TMP_PREFIX) and not path.is_symlink() and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, step: int, write: WriteFiles) -> Path:
    """Write checkpoint ``step`` into a hidden directory, flush it, verify it, rename it into place
    and prune older ones; returns its path."""
    root = checkpoints_root(Path(run_dir))
    root.mkdir(exist_ok=True)
    final, tmp = root / checkpoint_name(step), root / f"{TMP_PREFIX}{checkpoint_name(step)}"
    if tmp.is_symlink():
        tmp.unlink()
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    _fsync_dir(tmp)
    verify_checkpoint(tmp)
    if final.is_symlink():
        final.unlink()
    elif final.exists():  # a damaged checkpoint of this step, skipped on resume
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    prune(root)
    return final


def forget_ray_record(run_dir: Path) -> None:
    """Remove Ray Train's record of an earlier job (``RUN/checkpoints/checkpoint_manager_snapshot.json``):
    Ray would restore the checkpoint it names and delete those it lists, wherever they are."""
    path = checkpoints_root(Path(run_dir)) / RAY_SNAPSHOT
    if os.path.lexists(path):
        path.unlink()


class Checkpoints(Protocol):
    """Where a worker's checkpoints go and come back from."""

    def load(self) -> Optional[dict[str, Any]]:
        """The checkpoint to continue from (a :func:`read_checkpoint` result), or None."""

    def save(self, step: int, write: Optional[WriteFiles], metrics: dict[str, Any]) -> None:
        """Checkpoint ``step``: ``write`` fills its directory (None on ranks other than 0)."""


class LocalCheckpoints:
    """Checkpoints written by this process into ``RUN/checkpoints`` (:func:`save_checkpoint`);
    ``load`` continues from the newest intact one when ``resume``."""

    #: Skipped damaged checkpoints are a warning here; Ray Train workers leave that line to the driver.
    log_level = logging.WARNING

    def __init__(self, run_dir: Path, resume: bool) -> None:
        self.run_dir = Path(run_dir)
        self.resume = resume

    def load(self) -> Optional[dict[str, Any]]:
        """The newest intact checkpoint's contents when resuming, else None."""
        found = find_checkpoint(self.run_dir) if self.resume else Found(None, 0, [])
        if found.damaged:
            log.log(self.log_level, "%s", found.describe())
        return read_checkpoint(found.path) if found.path is not None else None

    def save(self, step: int, write: Optional[WriteFiles], metrics: dict[str, Any]) -> None:
        if write is not None:
            save_checkpoint(self.run_dir, step, write)


class RayCheckpoints(LocalCheckpoints):
    """Checkpoints of a Ray Train worker: rank 0 writes them as :class:`LocalCheckpoints` does (into
    the run directory, which every worker reaches), then every rank reports the metrics to Ray
    (``report`` is a barrier). ``load`` always takes the newest intact checkpoint: the driver empties
    ``RUN/checkpoints`` for a new run, so after a worker restart that is the one this job wrote."""

    log_level = logging.INFO

    def __init__(self, run_dir: Path) -> None:
        super().__init__(run_dir, resume=True)

    def save(self, step: int, write: Optional[WriteFiles], metrics: dict[str, Any]) -> None:
        import ray.train

        super().save(step, write, metrics)
        ray.train.report(metrics)
