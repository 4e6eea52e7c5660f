"""Output files written whole or not at all.

Every result file (images, reports, teacher weights) is written to a temporary name beside its
final one, flushed to disk, and only then renamed into place (``os.replace`` is atomic within a
directory). A failure, a full disk or a signal leaves no partial file under the final name, so
nothing half-written can be taken for a result or block the rerun ("already holds ...").

safetensors files are also written the same byte for byte each time (:func:`canonical_safetensors`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

#: How a Rust ``std::io::Error`` names its errno in another library's message: safetensors' on a full
#: disk is ``SafetensorError("Error while serializing: I/O error: No space left ... (os error 28)")``.
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)|\bOs \{ code: (\d+)")

#: numpy's ``ndarray.tofile`` (``np.save``) on a full disk: an ``OSError`` without errno.
_SHORT_WRITE = re.compile(r"^\d+ requested and \d+ written$")


def temporary_name(path: Path) -> Path:
    """The hidden temporary file beside ``path``; it keeps the suffix, which PIL and numpy read."""
    return path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")


def as_os_error(exc: BaseException, path: Path, renames: Optional[dict[str, str]] = None) -> Optional[OSError]:
    """``exc`` as an ``OSError`` naming a final path when it is a system error, else None: an
    ``OSError`` keeps its file name (a temporary one mapped back through ``renames``) or gets
    ``path``; another library's error wrapping an errno (safetensors') becomes one naming ``path``."""
    if isinstance(exc, OSError) and exc.errno is None and _SHORT_WRITE.search(str(exc)):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    if isinstance(exc, OSError) and exc.errno is not None:
        filename = exc.filename if exc.filename is not None else str(path)
        filename = (renames or {}).get(str(filename), filename)
        return exc if filename == exc.filename else OSError(exc.errno, exc.strerror, str(filename))
    match = _RUST_OS_ERROR.search(str(exc))
    if match:
        code = int(match.group(1) or match.group(2))
        return OSError(code, os.strerror(code), str(path))
    return None


def _sync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_outputs(paths: Sequence[Path | str]) -> Iterator[list[Path]]:
    """Yield one temporary path per entry of ``paths``; when the block succeeds each is synced and
    renamed to its final path, when it fails (or a temporary file was not written) every temporary
    file is removed and the final paths are left as they were. System errors are re-raised naming
    the final path (a full disk is then reported as one, with its file)."""
    finals = [Path(p) for p in paths]
    temps = [temporary_name(p) for p in finals]
    try:
        yield temps
        for temp, final in zip(temps, finals):
            if not temp.is_file():
                raise FileNotFoundError(errno.ENOENT, "the output was not written", str(final))
            _sync(temp)
        for temp, final in zip(temps, finals):
            os.replace(temp, final)
    except BaseException as exc:
        for temp in temps:
            with contextlib.suppress(OSError):
                temp.unlink()
        if isinstance(exc, Exception):
            where = finals[0] if len(finals) == 1 else finals[0].parent
            system = as_os_error(exc, where, {str(t): str(f) for t, f in zip(temps, finals)})
            if system is not None and system is not exc:
                raise system from exc
        raise


def canonical_safetensors(data: bytes, metadata: Optional[Mapping[str, str]] = None) -> bytes:
    """The safetensors file ``data`` with a canonical header: its metadata (or ``metadata`` in its
    place) first, keys sorted, the tensors' entries as written. safetensors writes metadata in the
    order of a Rust hash map seeded per process, so the same tensors and metadata otherwise give
    other bytes in every process (a resumed run's export would differ from an uninterrupted one's)."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    recorded = header.pop("__metadata__", None)
    metadata = recorded if metadata is None else metadata
    if metadata:
        header = {"__metadata__": dict(sorted(metadata.items())), **header}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data to 8 bytes
    return len(text).to_bytes(8, "little") + text + data[8 + size:]


def save_safetensors(tensors: Mapping[str, Any], path: Path | str, metadata: Optional[Mapping[str, str]] = None) -> None:
    """``safetensors.torch.save_file`` with a canonical header (:func:`canonical_safetensors`)."""
    from safetensors.torch import save

    Path(path).write_bytes(canonical_safetensors(save(dict(tensors), metadata=dict(metadata) if metadata else None)))
