"""Filesystem, Zarr-store and dtype helpers shared by the writer, the reader and the stream.

Every dataset location is resolved through fsspec (``fsspec.core.url_to_fs``), so a plain path,
``file://``, ``memory://`` and object stores (``s3://bucket/ds`` with s3fs installed, credentials from
``storage_options`` or the usual environment) all take the same code path. Zarr shards are opened on
a ``zarr.storage.LocalStore`` for local disks and on a ``zarr.storage.FsspecStore`` otherwise.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from arcflow.core.errors import ArcflowError

#: fsspec protocols of object stores: the first path component is a bucket (container), and there
#: are no directories, only keys (a "directory" exists while some object lies under it).
OBJECT_STORE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2"})


def absolute_url(url: str | os.PathLike) -> str:
    """``url`` with a relative local path made absolute (another process, e.g. a Ray worker, may
    have another working directory); URLs with a protocol are returned as they are."""
    url = str(url)
    return url if "://" in url or "::" in url else os.path.abspath(url)


class Location:
    """A dataset root: an fsspec filesystem plus the root path inside it (picklable)."""

    def __init__(self, url: str | os.PathLike, storage_options: dict | None = None):
        self.url = str(url)
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.root = self.root.rstrip("/") or "/"
        self.is_local = isinstance(self.fs, LocalFileSystem)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        self.is_object_store = not self.is_local and bool(OBJECT_STORE_PROTOCOLS.intersection(protocols))
        #: Whether the data lives in this process's memory only (``memory://``): it does not outlive the
        #: process, and no other process (a Ray worker) sees it.
        self.is_process_local = "memory" in protocols

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def read_bytes(self, *parts: str) -> bytes:
        return self.fs.cat_file(self.path(*parts))

    def listdir_names(self, *parts: str) -> list[str]:
        p = self.path(*parts)
        try:
            # refresh: another process may have committed since this filesystem (fsspec caches the
            # instances) last listed here; s3fs would otherwise answer from its listings cache.
            entries = self.fs.ls(p, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def write_atomic(self, data: bytes, *parts: str) -> None:
        """Write a file so that readers see either nothing or all of it.

        Local disks: write a hidden temp file (leading ``.``: pyarrow's dataset discovery and our
        own listing ignore it) next to the target, fsync, then ``os.replace``. Object stores and
        other filesystems: one whole-object write (``fs.pipe_file``), which is atomic there.
        """
        target = self.path(*parts)
        parent, name = target.rsplit("/", 1)
        if self.is_local:
            os.makedirs(parent, exist_ok=True)
            tmp = f"{parent}/.{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        else:
            self.fs.pipe_file(target, data)

    def rm_tree(self, *parts: str) -> None:
        p = self.path(*parts)
        if self.fs.exists(p):
            self.fs.rm(p, recursive=True)

    def rm_file(self, *parts: str) -> None:
        p = self.path(*parts)
        if self.fs.exists(p):
            self.fs.rm_file(p)

    def makedirs(self, *parts: str) -> None:
        """Create a directory. Nothing on object stores: they have no directories (and s3fs would
        create a missing BUCKET here, where a typo should be an error)."""
        if self.is_object_store:
            return
        self.fs.makedirs(self.path(*parts), exist_ok=True)

    def check_writable(self, flag: str = "--out") -> None:
        """Refuse, before any work, a local root that cannot be created or written: a path under a
        regular file, or on a read-only / unwritable filesystem. On an object store, one request
        reaches the endpoint with the credentials (their errors surface here, see cli/errors.py),
        and a root in a bucket that does not exist is refused. (Permissions show on the first write.)"""
        if self.is_object_store:
            bucket = self.root.strip("/").split("/", 1)[0]
            try:
                self.fs.ls(self.root, detail=False, refresh=True)  # raises for no endpoint / credentials
            except FileNotFoundError:  # nothing under the root yet, or no bucket
                if bucket and not self.fs.exists(bucket):
                    raise ArcflowError(
                        f"{flag} {self.url}: bucket {bucket!r} does not exist (or these credentials cannot see it); "
                        "create it first or fix the URL"
                    ) from None
            return
        if not self.is_local:
            return
        path = os.path.abspath(self.root)
        ancestor = path
        while not os.path.exists(ancestor):
            ancestor = os.path.dirname(ancestor)
        if not os.path.isdir(ancestor):
            raise ArcflowError(f"{flag} {self.url}: {ancestor} is a file, not a directory; choose another path")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise ArcflowError(f"{flag} {self.url}: {ancestor} is not writable (read-only filesystem or permissions)")

    def zarr_store(self, *parts: str, read_only: bool):
        import zarr.storage

        p = self.path(*parts)
        if self.is_local:
            return zarr.storage.LocalStore(p, read_only=read_only)
        # s3fs/gcsfs: zarr makes an asynchronous twin of the same filesystem; memory and other
        # synchronous filesystems are wrapped in fsspec's AsyncFileSystemWrapper.
        return zarr.storage.FsspecStore.from_mapper(self.fs.get_mapper(p), read_only=read_only)

    def __repr__(self) -> str:
        return f"Location({self.url!r})"


# -- arrays ----------------------------------------------------------------------------------------


def to_numpy(a: Any, name: str = "array") -> np.ndarray:
    """numpy array from a numpy array, a torch CPU tensor (any float dtype incl. bfloat16) or a list."""
    if hasattr(a, "detach") and hasattr(a, "cpu"):  # torch tensor, without importing torch here
        a = a.detach().cpu()
        if str(a.dtype) == "torch.bfloat16":
            a = a.float()
        a = a.numpy()
    try:
        return np.asarray(a)
    except Exception as e:  # pragma: no cover - odd inputs
        raise ArcflowError(f"{name}: cannot convert {type(a).__name__} to an array ({e})") from None


def float32_to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (round to nearest even, as torch does) and return the 16 bits as uint16."""
    # Not torch's .to(torch.bfloat16): bit-identical on every non-NaN float32, but it turns every NaN into 0xFFFF.
    a = np.ascontiguousarray(a, dtype=np.float32)
    bits = a.view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    out = ((bits + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():  # keep NaN a (quiet) NaN with its sign, never round it into an infinity
        out[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)
    return out


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def float32_to_float8_bits(a: np.ndarray) -> np.ndarray:
    """Round float32 (already scaled into +-448) to float8 e4m3fn, nearest even, as uint8 bits."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    return t.to(torch.float8_e4m3fn).view(torch.uint8).numpy()


_FLOAT8_TABLE: np.ndarray | None = None


def float8_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint8 float8 e4m3fn bits -> float32 (a 256-entry table lookup)."""
    global _FLOAT8_TABLE
    if _FLOAT8_TABLE is None:
        import torch

        codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
        _FLOAT8_TABLE = codes.view(torch.float8_e4m3fn).float().numpy()
    return _FLOAT8_TABLE[np.asarray(bits, dtype=np.uint8)]


def encode_float(a: np.ndarray, storage_dtype: str) -> np.ndarray:
    """float array -> the array actually written to Zarr for ``storage_dtype`` (float8: pre-scaled)."""
    if storage_dtype == "bfloat16":
        return float32_to_bf16_bits(a)
    if storage_dtype == "float8_e4m3":
        return float32_to_float8_bits(a)
    return np.ascontiguousarray(a, dtype=storage_dtype)


def decode_float(a: np.ndarray, arcflow_dtype: str | None, out_dtype=np.float32) -> np.ndarray:
    """Stored array -> floating numpy array of ``out_dtype`` (None: keep float16/float32 as stored)."""
    if arcflow_dtype in ("bfloat16", "float8_e4m3"):
        f = bf16_bits_to_float32(a) if arcflow_dtype == "bfloat16" else float8_bits_to_float32(a)
        return f if out_dtype is None else f.astype(out_dtype, copy=False)
    return a if out_dtype is None else a.astype(out_dtype, copy=False)


def zarr_compressors(compression: str, level: int, checksum: bool = False) -> list:
    """Zarr bytes-to-bytes codecs: the compressor, then (``checksum``) a CRC32C of the compressed bytes."""
    import zarr.codecs

    if compression == "none":
        codecs = []
    elif compression == "zstd":
        codecs = [zarr.codecs.ZstdCodec(level=level)]
    elif compression == "blosc-zstd":
        codecs = [zarr.codecs.BloscCodec(cname="zstd", clevel=level, shuffle="shuffle")]
    else:
        raise ArcflowError(f"unknown compression {compression!r}")
    return [*codecs, zarr.codecs.Crc32cCodec()] if checksum else codecs
