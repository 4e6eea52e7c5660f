"""Turning any failure into the one line the CLI prints (``arcflow: error: ...``).

Errors reach the CLI boundary wrapped in other errors: a Ray task error around a worker's exception,
Ray Train's ``WorkerGroupError`` around each rank's, ``raise ... from`` chains. :func:`describe`
walks all of them, prefers our own :class:`ArcflowError` (whose message is written for the user),
then an object store's (no credentials, endpoint unreachable, request refused: botocore's errors
under s3fs), then a system error (disk full, read-only, a path under a file, undecodable text),
and words it as one line that names the path and what to do. Anything else is reported by type
and first line.
"""

from __future__ import annotations

import errno
from typing import Iterator
from urllib.parse import urlsplit

from arcflow.core.errors import TRACEBACK_ENV, ArcflowError, clip, first_line

__all__ = ["TRACEBACK_ENV", "causes", "describe", "message_of"]

#: How torch re-raises an error from a DataLoader worker process: the original type, with the whole
#: original traceback as its message (``torch.utils.data._utils.ExceptionWrapper``).
_WRAPPED_TRACEBACK = "Original Traceback (most recent call last):"


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


#: The advice per errno; ``{rerun}`` becomes what the failed command can do next.
_ERRNO_ADVICE = {
    errno.ENOSPC: "no space left on the device; free some space, then {rerun}",
    errno.EDQUOT: "disk quota exceeded; free some space, then {rerun}",
    errno.EFBIG: "file size limit reached; raise the limit or free space, then {rerun}",
    errno.EROFS: "the filesystem is read-only; choose a writable location",
    errno.EACCES: "permission denied; choose a location you can write to (or read, for inputs)",
    errno.EPERM: "operation not permitted; choose a location you can write to",
    errno.ENOTDIR: "a part of this path is a file, not a directory; choose another path",
    errno.EISDIR: "this is a directory, but a file was expected",
    errno.ENOENT: "no such file or directory",
    errno.EEXIST: "it already exists",
    errno.ENAMETOOLONG: "the path is too long",
}


def _describe_os_error(exc: OSError, resumable: bool) -> str:
    where = clip(exc.filename) if exc.filename is not None else None
    rerun = "rerun with --resume" if resumable else "rerun the command"
    advice = _ERRNO_ADVICE.get(exc.errno or -1, exc.strerror or str(exc)).format(rerun=rerun)
    return f"{where}: {advice}" if where is not None else advice


def message_of(exc: BaseException) -> str:
    """``str(exc)``, or for an error torch re-raised from a DataLoader worker process (its message
    the whole original traceback) the original message: the traceback's last line, less its type."""
    text = str(exc)
    if _WRAPPED_TRACEBACK not in text:
        return text
    last = (text.strip().splitlines() or [text])[-1].strip()
    prefix = f"{type(exc).__module__}.{type(exc).__qualname__}: "
    for name in (prefix, f"{type(exc).__qualname__}: "):
        if last.startswith(name):
            return last[len(name):]
    return last


def _is_wrapper(exc: BaseException) -> bool:
    if type(exc).__module__.startswith("ray"):
        return True
    return any(getattr(exc, name, None) for name in ("cause", "worker_failures", "controller_failure"))


#: Object-store (botocore) failures by class name, matched without importing botocore.
_NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError")
_NO_CONNECTION = ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ProxyConnectionError")
_CREDENTIALS_ADVICE = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or FSSPEC_S3_KEY and FSSPEC_S3_SECRET"
)
_REFUSED_CODES = {
    "InvalidAccessKeyId": "the access key is not known there",
    "SignatureDoesNotMatch": "the secret key does not match the access key",
    "ExpiredToken": "the session token has expired",
    "AccessDenied": "access denied",
}


def _describe_object_store(exc: BaseException) -> str | None:
    """One line for a botocore error (raised by s3fs), or None for anything else."""
    if not type(exc).__module__.startswith("botocore"):
        return None
    names = {c.__name__ for c in type(exc).__mro__}
    if names.intersection(_NO_CREDENTIALS):
        return f"no credentials for the object store ({exc}); {_CREDENTIALS_ADVICE}"
    if names.intersection(_NO_CONNECTION):
        endpoint = getattr(exc, "kwargs", {}).get("endpoint_url") or ""
        parts = urlsplit(endpoint)
        endpoint = f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else str(exc)
        return (
            f"cannot reach the object store at {endpoint}; check the endpoint (FSSPEC_S3_ENDPOINT_URL or "
            "AWS_ENDPOINT_URL) and that the server is up"
        )
    error = (getattr(exc, "response", None) or {}).get("Error") or {}
    code = error.get("Code")
    if code is None:
        return None
    message = error.get("Message") or code
    if code == "NoSuchBucket":
        bucket = error.get("BucketName")
        return f"bucket {bucket!r} does not exist; create it first or fix the URL" if bucket else message
    if code in _REFUSED_CODES:
        return f"the object store refused the request: {_REFUSED_CODES[code]} ({code}: {message}); {_CREDENTIALS_ADVICE}"
    return f"the object store answered {code}: {message}"


def describe(exc: BaseException, resumable: bool = False) -> str:
    """The one-line message for ``exc`` (see the module docstring); ``resumable``: the command has
    ``--resume``, which the advice after a full disk may then name."""
    chain = list(causes(exc))
    for item in chain:
        if isinstance(item, ArcflowError):
            return message_of(item)
    for item in chain:  # before OSError: s3fs raises OSErrors caused by botocore's errors
        if not _is_wrapper(item):
            message = _describe_object_store(item)
            if message is not None:
                return message
    for item in chain:
        if isinstance(item, OSError) and item.errno is not None:
            return _describe_os_error(item, resumable)
        if isinstance(item, UnicodeDecodeError):
            return f"input is not UTF-8 text ({item.reason} at byte {item.start}); give a UTF-8 text file"
        if isinstance(item, MemoryError):
            return "out of memory; lower --batch-size / --shard-size or use a larger machine"
    # the nearest exception that is not a wrapper around another one (Ray's, Ray Train's)
    root = next((c for c in chain if not _is_wrapper(c)), exc)
    unwrapped = message_of(root)
    first = first_line(root if unwrapped == str(root) else Exception(unwrapped))
    return f"unexpected {type(root).__name__}: {first} (rerun with --verbose for the traceback)"
