"""A zarr store wrapper for format v2 shards: an absent chunk is damage, not the fill value.

Format v2 writes every chunk of every array (``write_empty_chunks``), so a chunk that is not there
was deleted or lost; zarr would silently read it as zeros. Reads also count the chunk keys they
fetched (``keys_read``), which the tests use to check that a segment read touches only its chunks.
"""

from __future__ import annotations

from zarr.storage import WrapperStore


class MissingChunk(FileNotFoundError):
    """A chunk a strict store was asked for is not there (deleted or never written)."""


class StrictStore(WrapperStore):
    """Raises :class:`MissingChunk` for an absent chunk key (array and group ``zarr.json`` excepted)."""

    keys_read: list[str] | None = None  # set to a list to record every key fetched

    async def get(self, key, prototype, byte_range=None):
        value = await super().get(key, prototype, byte_range)
        if self.keys_read is not None:
            self.keys_read.append(key)
        if value is None and not key.endswith("zarr.json"):
            raise MissingChunk(f"chunk {key} is missing")
        return value
