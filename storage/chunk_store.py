"""Zarr store wrappers for format v2 shards: an absent chunk is damage, and a chunk must be the one
the shard's manifest recorded at that place.

Format v2 writes every chunk of every array (``write_empty_chunks``), so a chunk that is not there
was deleted or lost; zarr would silently read it as zeros. A chunk's own CRC32C only says the chunk
is intact, not that it belongs where it lies (a valid chunk copied from another shard passes it), so
the writer records every object it writes (``RecordingStore``: key -> size and BLAKE2b digest of the
stored bytes; not a CRC32C, which over a chunk ending in its own CRC32C is the same constant for every
chunk) into the shard's manifest, committed with the shard's index part, and readers compare every
object they fetch against it. Reads also count the keys they fetched (``keys_read``), which the
tests use to check that a segment read touches only its chunks.
"""

from __future__ import annotations

import hashlib
import json
from typing import Iterable

from zarr.storage import WrapperStore

#: key -> [size in bytes, BLAKE2b-128 hex digest of the stored bytes]
Manifest = dict[str, list]


class MissingChunk(FileNotFoundError):
    """A chunk a strict store was asked for is not there (deleted or never written)."""


class ChunkMismatch(ValueError):
    """A stored object differs from what the shard's manifest recorded at its key."""


def fingerprint(data: bytes) -> list:
    """[size, BLAKE2b-128 hex digest] of an object's stored bytes (what a manifest records)."""
    return [len(data), hashlib.blake2b(data, digest_size=16).hexdigest()]


def manifest_to_json(manifest: Manifest) -> str:
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"))


def manifest_from_json(text: bytes | str) -> Manifest:
    """The manifest recorded in an index part; ``ValueError`` when it is not a manifest."""
    data = json.loads(text)
    if not isinstance(data, dict) or not all(
        isinstance(v, list) and len(v) == 2 and isinstance(v[0], int) and isinstance(v[1], str) for v in data.values()
    ):
        raise ValueError("the chunk manifest is malformed")
    return data


class RecordingStore(WrapperStore):
    """Passes writes through and records the fingerprint of every object written (``manifest``)."""

    def __init__(self, store) -> None:
        super().__init__(store)
        self.manifest: Manifest = {}

    async def set(self, key, value) -> None:
        await super().set(key, value)
        self.manifest[key] = fingerprint(value.to_bytes())

    async def _set_many(self, values: Iterable) -> None:
        values = list(values)
        await super()._set_many(values)
        for key, value in values:
            self.manifest[key] = fingerprint(value.to_bytes())

    async def delete(self, key) -> None:
        await super().delete(key)
        self.manifest.pop(key, None)


class StrictStore(WrapperStore):
    """Raises :class:`MissingChunk` for an absent chunk key (array and group ``zarr.json`` excepted,
    unless the manifest lists them) and :class:`ChunkMismatch` for an object that differs from the
    ``manifest`` (None: a shard written before manifests; only presence is checked)."""

    keys_read: list[str] | None = None  # set to a list to record every key fetched

    def __init__(self, store, manifest: Manifest | None = None) -> None:
        super().__init__(store)
        self.manifest = manifest

    def _with_store(self, store) -> "StrictStore":
        return type(self)(store, self.manifest)

    async def get(self, key, prototype, byte_range=None):
        value = await super().get(key, prototype, byte_range)
        if self.keys_read is not None:
            self.keys_read.append(key)
        expected = self.manifest.get(key) if self.manifest is not None else None
        if value is None and (expected is not None or not key.endswith("zarr.json")):
            raise MissingChunk(f"chunk {key} is missing")
        if expected is not None and byte_range is None and fingerprint(value.to_bytes()) != expected:
            raise ChunkMismatch(f"{key} differs from the shard's manifest (altered, or copied from another place)")
        return value
