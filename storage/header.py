"""dataset.json against its shards: a header that disagrees with every shard in the same way is the
damaged object, not the shards.

Each committed shard records part of the header in its own metadata (its group's attributes, its
arrays' shapes and dtypes, its ``sigmas`` array), every object checked against the shard's manifest
on the way. When all shards whose metadata reads record the same values and those differ from
dataset.json, the header was edited or damaged: uncommitting the shards would throw away intact
data that ``--resume`` could then not rebuild under the changed header.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from arcflow.core.errors import ArcflowError
from arcflow.storage.format import RESERVED_ARRAYS, DatasetSpec, short_value
from arcflow.storage.shards import stored_dtype, damaged_array

#: What a shard records, by the dataset.json field it comes from; missing values are not compared.
Record = dict[str, Any]


def implied_record(spec: DatasetSpec) -> Record:
    """What dataset.json says every shard records."""
    states = stored_dtype(spec.state_dtype)
    record: Record = {
        "format_version": spec.format_version,
        "storage_dtype": spec.storage_dtype,
        "latent_shape": list(spec.latent_shape),
        "sigmas": list(spec.sigmas),
        "keyframe_every": f"{len(spec.keyframe_steps)} keyframes",
    }
    for name, f in spec.cond_spec.items():
        record[f"cond_spec.{name}"] = _cond_text(f.shape, states if f.is_floating else f.dtype, spec.format_version)
    return record


def shard_record(url: str, shard_id: int, attrs: dict, arrays: dict, format_version: int) -> Record:
    """What one shard records (``attrs`` of its group, its zarr ``arrays``), read as dataset.json's
    ``format_version`` says; one line naming the shard when its ``sigmas`` do not read back."""
    u, x = arrays.get("u"), arrays.get("x")
    record: Record = {
        "format_version": attrs.get("format_version"),
        "storage_dtype": attrs.get("storage_dtype"),
        "latent_shape": list(u.shape[2:]) if u is not None else None,
        "sigmas": _sigmas(url, shard_id, arrays),
        "keyframe_every": f"{x.shape[1]} keyframes" if x is not None and x.ndim > 1 else None,
    }
    for name, a in arrays.items():
        if name not in RESERVED_ARRAYS:
            record[f"cond_spec.{name}"] = _cond_text(a.shape[1:], str(a.dtype), format_version)
    return record


def _cond_text(shape, stored: str, format_version: int) -> str:
    """A conditioning field as compared: its shape, and in format v2 its stored dtype (v1 kept none)."""
    return f"shape {list(shape)}" + (f" stored as {stored}" if format_version >= 2 else "")


def _sigmas(url: str, shard_id: int, arrays: dict) -> list[float] | None:
    if "sigmas" not in arrays:
        return None
    try:
        return np.asarray(arrays["sigmas"][...], dtype=np.float64).tolist()
    except Exception as exc:  # crc32c mismatch, missing chunk, codec errors
        raise damaged_array(url, shard_id, "sigmas", exc) from None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list) and isinstance(b, list) and a and all(isinstance(v, float) for v in a + b):
        return len(a) == len(b) and np.allclose(a, b, rtol=0, atol=1e-6)  # the readers' sigma tolerance
    return a == b


def record_diffs(header: Record, shards: Record) -> list[str]:
    """``field: dataset.json has X, the shards hold Y`` for each field the shards record otherwise."""
    out = []
    for key in sorted(header.keys() | shards.keys()):
        mine, theirs = header.get(key), shards.get(key)
        if theirs is None and not key.startswith("cond_spec."):
            continue  # not recorded by this format version
        if not _same(mine, theirs):
            out.append(f"{key}: dataset.json has {_text(mine)}, the shards hold {_text(theirs)}")
    return out


def _text(value: Any) -> str:
    return "nothing" if value is None else value if isinstance(value, str) else short_value(value)


def header_problem(reader, shards: list[int]) -> str | None:
    """The one-line problem when dataset.json disagrees with every committed shard (of ``shards``)
    whose metadata reads, all in the same way; None otherwise (any damage is then the shards' own)."""
    records = []
    for shard in shards:
        try:
            records.append(shard_record(reader.url, shard, *reader.stored(shard), reader.spec.format_version))
        except ArcflowError:  # this shard's own damage: verify_shard names it
            continue
    if not records or any(r != records[0] for r in records[1:]):
        return None
    diffs = record_diffs(implied_record(reader.spec), records[0])
    if not diffs:
        return None
    return (f"dataset {reader.url}: dataset.json is damaged, not the shards: it disagrees with all {len(records)} "
            f"committed shard(s) in the same way ({'; '.join(diffs)}); restore dataset.json")
