"""Turning any failure into the one line the CLI prints (``arcflow: error: ...``).

Errors reach the CLI boundary wrapped in other errors: a Ray task error around a worker's exception,
Ray Train's ``WorkerGroupError`` around each rank's, ``raise ... from`` chains. :func:`describe`
walks all of them, prefers our own :class:`ArcflowError` (whose message is written for the user),
then a system error (disk full, read-only, a path under a file, undecodable text), and words it as
one line that names the path and what to do. Anything else is reported by type and first line.
"""

from __future__ import annotations

import errno
from typing import Iterator

from arcflow.storage.errors import ArcflowError

#: Set by ``--verbose``; the environment variable does the same for scripts.
TRACEBACK_ENV = "ARCFLOW_TRACEBACK"


def causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception it wraps (Ray task causes, Ray Train worker failures, chains)."""
    stack, seen = [exc], set()
    while stack:
        current = stack.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack.append(getattr(current, "cause", None))
        stack.extend((getattr(current, "worker_failures", None) or {}).values())
        stack.append(getattr(current, "controller_failure", None))
        stack.append(current.__cause__)
        stack.append(current.__context__)
        if isinstance(getattr(current, "args", None), tuple):  # a failure stored as an argument
            stack.extend(a for a in current.args if isinstance(a, BaseException))


_ERRNO_ADVICE = {
    errno.ENOSPC: "no space left on the device; free some space, then rerun with --resume",
    errno.EDQUOT: "disk quota exceeded; free some space, then rerun with --resume",
    errno.EFBIG: "file size limit reached; raise the limit or free space, then rerun with --resume",
    errno.EROFS: "the filesystem is read-only; choose a writable location",
    errno.EACCES: "permission denied; choose a location you can write to (or read, for inputs)",
    errno.EPERM: "operation not permitted; choose a location you can write to",
    errno.ENOTDIR: "a part of this path is a file, not a directory; choose another path",
    errno.EISDIR: "this is a directory, but a file was expected",
    errno.ENOENT: "no such file or directory",
    errno.EEXIST: "it already exists",
    errno.ENAMETOOLONG: "the path is too long",
}


def _describe_os_error(exc: OSError) -> str:
    where = exc.filename if exc.filename is not None else None
    advice = _ERRNO_ADVICE.get(exc.errno or -1, exc.strerror or str(exc))
    return f"{where}: {advice}" if where is not None else advice


def _is_wrapper(exc: BaseException) -> bool:
    if type(exc).__module__.startswith("ray"):
        return True
    return any(getattr(exc, name, None) for name in ("cause", "worker_failures", "controller_failure"))


def describe(exc: BaseException) -> str:
    """The one-line message for ``exc`` (see the module docstring)."""
    chain = list(causes(exc))
    for item in chain:
        if isinstance(item, ArcflowError):
            return str(item)
    for item in chain:
        if isinstance(item, OSError) and item.errno is not None:
            return _describe_os_error(item)
        if isinstance(item, UnicodeDecodeError):
            return f"input is not UTF-8 text ({item.reason} at byte {item.start}); give a UTF-8 text file"
        if isinstance(item, MemoryError):
            return "out of memory; lower --batch-size / --shard-size or use a larger machine"
    # the nearest exception that is not a wrapper around another one (Ray's, Ray Train's)
    root = next((c for c in chain if not _is_wrapper(c)), exc)
    first = (str(root).strip().splitlines() or [""])[0]
    return f"unexpected {type(root).__name__}: {first} (rerun with --verbose for the traceback)"
