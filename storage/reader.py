"""Reading a trajectory dataset (format v1 or v2, see ``arcflow.storage.format``).

Only COMMITTED shards (those with a Parquet part in ``index/``) exist for a reader; a shard group
without its part is a write in progress or a crashed one (``uncommitted_shards()`` lists them).

The index is also readable with no arcflow at all: ``pandas.read_parquet("DATASET/index")`` (local)
or ``pandas.read_parquet("s3://bucket/DATASET/index")`` (with s3fs installed).
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

import numpy as np

from arcflow.storage import _io
from arcflow.core.errors import ArcflowError, first_line
from arcflow.storage.shards import INDEX_CHECKED, ShardArrays, damaged_shard, open_arrays
from arcflow.storage.format import (
    DATASET_JSON,
    INDEX_COLUMNS,
    INDEX_DIR,
    MANIFEST_KEY,
    SHARDS_DIR,
    DatasetSpec,
    index_part_name,
    parse_shard_name,
    shard_zarr_name,
)


def index_schema():
    import pyarrow as pa

    types = {"int64": pa.int64(), "int32": pa.int32(), "float64": pa.float64(), "float32": pa.float32(), "string": pa.string()}
    return pa.schema([pa.field(n, types[t]) for n, t in INDEX_COLUMNS])


def read_spec(loc: _io.Location) -> DatasetSpec:
    """The dataset's spec; ArcflowError (one line) for a missing dataset / dataset.json / bad version."""
    if not loc.fs.exists(loc.root):
        raise ArcflowError(f"dataset {loc.url} does not exist")
    if loc.fs.isfile(loc.root):
        raise ArcflowError(f"{loc.url} is a file, not a dataset directory")
    try:
        raw = loc.read_bytes(DATASET_JSON)
    except (FileNotFoundError, IsADirectoryError):
        raise ArcflowError(f"{loc.url} is not an arcflow dataset (no {DATASET_JSON})") from None
    try:
        return DatasetSpec.from_json(raw)
    except ArcflowError as e:
        raise ArcflowError(f"dataset {loc.url}: {e}") from None
    except (TypeError, ValueError, KeyError) as e:
        raise ArcflowError(f"dataset {loc.url}: {DATASET_JSON} is malformed ({e})") from None


def list_shards(loc: _io.Location) -> tuple[list[int], list[int]]:
    """(committed shard ids, uncommitted shard ids), each ascending. Temp files are ignored."""
    parts = {i for i in map(parse_shard_name, loc.listdir_names(INDEX_DIR)) if i is not None}
    groups = {i for i in map(parse_shard_name, loc.listdir_names(SHARDS_DIR)) if i is not None}
    return sorted(parts), sorted(groups - parts)


def part_metadata(loc: _io.Location, shard_id: int, steps: int):
    """The Parquet footer of a shard's index part; ``ArcflowError`` naming the part when it cannot be
    read (zero bytes, truncated, garbage), does not hold whole trajectories of index rows, or its
    footer says its rows are another shard's (a part copied over: its manifest would otherwise
    blame the shard's own, intact, ``zarr.json``)."""
    import pyarrow.parquet as pq

    name = f"{INDEX_DIR}/{index_part_name(shard_id)}"
    try:
        with loc.fs.open(loc.path(INDEX_DIR, index_part_name(shard_id)), "rb") as f:
            meta = pq.ParquetFile(f).metadata
    except FileNotFoundError:
        raise ArcflowError(f"dataset {loc.url}: shard {shard_id} is not committed (no {name})") from None
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for every kind of damage
        raise damaged_part(loc, shard_id, exc) from None
    names = meta.schema.to_arrow_schema().names
    if meta.num_rows < steps or meta.num_rows % steps or names != [n for n, _ in INDEX_COLUMNS]:
        raise damaged_part(loc, shard_id, f"{meta.num_rows} rows, columns {', '.join(names[:4])}...")
    others = sorted(_shards_listed(meta) - {shard_id})
    if others:
        raise damaged_part(loc, shard_id, f"its rows are shard {others[0]}'s: a part copied from another shard")
    return meta


def _shards_listed(meta) -> set[int]:
    """The values of the ``shard`` column, from the footer's row-group statistics (no rows read;
    empty where a writer kept no statistics)."""
    column = [n for n, _ in INDEX_COLUMNS].index("shard")
    found: set[int] = set()
    for i in range(meta.num_row_groups):
        stats = meta.row_group(i).column(column).statistics
        if stats is not None and stats.has_min_max:
            found |= {int(stats.min), int(stats.max)}
    return found


def damaged_part(loc: _io.Location, shard_id: int, reason: object) -> ArcflowError:
    """The one-line error for an index part that does not read back."""
    text = first_line(reason) if isinstance(reason, BaseException) else str(reason)
    return ArcflowError(
        f"dataset {loc.url}: index part {INDEX_DIR}/{index_part_name(shard_id)} of shard {shard_id} is damaged ({text}); "
        "rerun generate-trajectories with --resume to regenerate that shard"
    )


def readable_parts(loc: _io.Location, shard_ids: Iterable[int], steps: int) -> list[int]:
    """The shard ids among ``shard_ids`` whose index part reads back whole (see :func:`part_metadata`)."""
    good = []
    for i in shard_ids:
        try:
            part_metadata(loc, i, steps)
        except ArcflowError:
            continue
        good.append(i)
    return good


def open_dataset(url: str, storage_options: dict | None = None) -> "TrajectoryReader":
    """Open a dataset for reading (a path, ``file://``, ``memory://``, ``s3://bucket/prefix`` ...).

    Raises ``ArcflowError`` when it does not exist, has no dataset.json, or has an unknown
    ``format_version``. A dataset with no committed shards opens fine (generation may still be
    running); call ``require_committed_shards()`` where data is needed.
    """
    loc = _io.Location(url, storage_options)
    return TrajectoryReader(loc, read_spec(loc))


class TrajectoryReader:
    """Read access to one dataset. Floating data comes back as float32 unless asked otherwise."""

    def __init__(self, loc: _io.Location, spec: DatasetSpec):
        self.loc = loc
        self.spec = spec
        self._locator: dict[int, tuple[int, int]] | None = None
        self._checked: set[int] = set()  # shards whose values and index were checked

    @property
    def url(self) -> str:
        return self.loc.url

    # -- shards -----------------------------------------------------------------------------
    def committed_shards(self) -> set[int]:
        """Shards with a Parquet part, whether or not it reads back (``verify_shard`` tells)."""
        return set(list_shards(self.loc)[0])

    def uncommitted_shards(self) -> set[int]:
        """Shard groups without a Parquet part: in progress, or left by a crash (rewritten on resume)."""
        return set(list_shards(self.loc)[1])

    def require_committed_shards(self, shards: Iterable[int] | None = None) -> list[int]:
        """``shards`` (default: every committed shard) as ascending unique ids; ArcflowError (one
        line) when the dataset has no committed shards, or when one of ``shards`` is not committed."""
        done = list_shards(self.loc)[0]
        if not done:
            raise ArcflowError(
                f"dataset {self.url} has no committed shards yet (0 of {self.spec.num_shards}); "
                "run or finish generate-trajectories first"
            )
        if shards is None:
            return done
        selected = sorted({int(s) for s in shards})
        missing = sorted(set(selected) - set(done))
        if missing:
            raise ArcflowError(f"dataset {self.url}: shards {missing[:5]} are not committed")
        return selected

    def shard_sizes(self, shards: Iterable[int] | None = None) -> dict[int, int]:
        """Samples per committed shard, from the Parquet footers (no data read)."""
        ids = sorted(self.committed_shards() if shards is None else shards)
        return {i: part_metadata(self.loc, i, self.spec.steps).num_rows // self.spec.steps for i in ids}

    def manifest(self, shard_id: int, steps: int | None = None) -> dict[str, list] | None:
        """The chunk manifest committed with a shard's index part (None: written before manifests);
        one line naming the part when it is unreadable, its manifest malformed, or its rows not whole
        trajectories of ``steps`` (default: dataset.json's) steps."""
        from arcflow.storage.chunk_store import manifest_from_json

        meta = part_metadata(self.loc, shard_id, steps or self.spec.steps).metadata or {}
        raw = meta.get(MANIFEST_KEY.encode())
        if raw is None:
            return None
        try:
            return manifest_from_json(raw)
        except ValueError as exc:
            raise damaged_part(self.loc, shard_id, exc) from None

    def shard(self, shard_id: int) -> ShardArrays:
        """Decoded, windowed access to a committed shard (``arcflow.storage.shards.ShardArrays``).

        Format v2 shards are opened on a strict store: a missing chunk is an error, not zeros, and
        every object read must match the shard's manifest. The first time a reader opens a shard,
        it checks the arrays' metadata and small arrays against dataset.json and the index part
        against the arrays, so no reader ever reads a row the index misplaced."""
        manifest = self.manifest(shard_id)
        group = self._group(shard_id, manifest)
        shard = ShardArrays.open(self.url, self.spec, shard_id, group, self._array_names(shard_id, manifest))
        if shard_id not in self._checked:
            shard.check_values()
            shard.check_index(self._read_part(shard_id, list(INDEX_CHECKED)))
            self._checked.add(shard_id)
        return shard

    def stored(self, shard_id: int) -> tuple[dict, dict]:
        """(group attributes, name -> zarr array) of a committed shard as stored, each object checked
        against the shard's manifest but nothing against dataset.json (what the shard records)."""
        manifest = self.manifest(shard_id, steps=1)
        group = self._group(shard_id, manifest)
        arrays, _ = open_arrays(self.url, shard_id, group, self._array_names(shard_id, manifest))
        return dict(group.attrs), arrays

    def _group(self, shard_id: int, manifest: dict | None):
        """The shard's zarr group (format v2: on a strict store checked against ``manifest``)."""
        import zarr

        store = self.loc.zarr_store(SHARDS_DIR, shard_zarr_name(shard_id), read_only=True)
        if self.spec.format_version >= 2:
            from arcflow.storage.chunk_store import StrictStore

            store = StrictStore(store, manifest)
        try:
            return zarr.open_group(store, mode="r", zarr_format=3)
        except FileNotFoundError:
            raise ArcflowError(f"dataset {self.url}: shard {shard_id} is committed but its Zarr group is missing") from None
        except Exception as exc:  # a garbled or altered group zarr.json
            raise damaged_shard(self.url, shard_id, f"group metadata zarr.json is damaged ({first_line(exc, 160)})") from None

    def _array_names(self, shard_id: int, manifest: dict | None) -> list[str]:
        """The arrays of a shard: its group's sub-directories, and any its manifest lists (a
        deleted array is then missing, not absent)."""
        listed = set(self.loc.listdir_names(SHARDS_DIR, shard_zarr_name(shard_id))) - {"zarr.json"}
        recorded = {k.split("/", 1)[0] for k in (manifest or {}) if k.count("/") == 1 and k.endswith("/zarr.json")}
        return sorted(listed | recorded)

    def read_shard(self, shard_id: int, rows: Sequence[int] | None = None, dtype=np.float32) -> dict[str, np.ndarray]:
        """All data of a committed shard, as format v1 laid it out: ``x`` [n, S+1, *latent] (every
        state; v2 rebuilds those between keyframes), ``u`` [n, S, *latent], ``sigmas`` [S+1] float64,
        each cond field [n, ...], ``sample_id``, ``seed``, ``guidance`` [n]. Floating arrays (except
        sigmas) come back as ``dtype``. ``rows`` selects samples (any order)."""
        shard = self.shard(shard_id)
        order = np.arange(shard.num_samples) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
        sel, back = np.unique(order, return_inverse=True)  # zarr wants sorted, unique selections
        x, u = shard.trajectories(sel)
        out = {"x": x, "u": u, **shard.conditioning(sel, list(self.spec.cond_spec)), **shard.metadata(sel)}
        out = {k: v[back] for k, v in out.items()}
        for k, v in out.items():
            if v.dtype.kind == "f":
                out[k] = v.astype(dtype, copy=False)
        out["sigmas"] = shard.read("sigmas")
        return out

    def read_sample(self, sample_id: int, dtype=np.float32) -> dict:
        """One trajectory by sample id (reads only its chunks): like ``read_shard`` without the
        leading axis, plus ``prompt``, ``shard`` and ``row``."""
        shard, row = self.locate(sample_id)
        arrays = self.read_shard(shard, rows=[row], dtype=dtype)
        out = {k: (v if k == "sigmas" else v[0]) for k, v in arrays.items()}
        part = self._read_part(shard, columns=["row", "prompt"])
        out["prompt"] = _prompt_of(part, row)
        out["shard"], out["row"] = shard, row
        return out

    def locate(self, sample_id: int) -> tuple[int, int]:
        """(shard, row) of a committed sample id. The shard is the one whose index part lists it, not
        the part's shard column: reading that shard then checks the whole part against its arrays."""
        if self._locator is None:
            self._locator = {}
            for i in sorted(self.committed_shards()):
                df = self._read_part(i, ["sample_id", "row", "step"]).to_pandas()
                df = df[df["step"] == 0]
                self._locator.update(zip(df["sample_id"].tolist(), zip([i] * len(df), df["row"].tolist())))
        try:
            return self._locator[int(sample_id)]
        except KeyError:
            raise ArcflowError(f"dataset {self.url}: no committed sample with id {sample_id}") from None

    def verify_shard(self, shard_id: int) -> str | None:
        """Read every chunk of every array of a committed shard (checksums and presence are checked by
        the reads); returns None when it is whole, else the one-line problem."""
        try:
            part_metadata(self.loc, shard_id, self.spec.steps)
            shard = self.shard(shard_id)
            for name, arr in shard.arrays.items():
                step = max(1, int(arr.chunks[0])) if arr.ndim else 1
                for start in range(0, max(1, arr.shape[0] if arr.ndim else 1), step):  # chunk rows at a time
                    shard.read(name, slice(start, start + step) if arr.ndim else Ellipsis)
        except ArcflowError as exc:
            return str(exc)
        return None

    # -- index ------------------------------------------------------------------------------
    def _read_part(self, shard_id: int, columns=None):
        import pyarrow.parquet as pq

        part_metadata(self.loc, shard_id, self.spec.steps)  # one line naming a damaged part
        try:
            with self.loc.fs.open(self.loc.path(INDEX_DIR, index_part_name(shard_id)), "rb") as f:
                return pq.read_table(f, columns=columns)
        except Exception as exc:  # damage past an intact footer
            raise damaged_part(self.loc, shard_id, exc) from None

    def index(self, columns: Sequence[str] | None = None, shards: Iterable[int] | None = None):
        """The Parquet index of the committed shards (or of ``shards``) as a pandas DataFrame,
        ordered by (shard, row, step)."""
        import pyarrow as pa

        ids = sorted(self.committed_shards() if shards is None else shards)
        cols = list(columns) if columns is not None else None
        if not ids:
            return index_schema().empty_table().select(cols or index_schema().names).to_pandas()
        tables = [self._read_part(i, cols) for i in ids]
        return pa.concat_tables(tables).to_pandas()

    # -- bookkeeping ------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """``sha256:<hex>`` of dataset.json and the committed Parquet parts (names and bytes).

        Stable while the committed data is unchanged; it changes when shards are added or rewritten
        (a rewrite by a different pyarrow version may change a part's bytes, hence the hash).
        Students record it to say which data they were trained on.
        """
        h = hashlib.sha256()
        h.update(self.loc.read_bytes(DATASET_JSON))
        for i in sorted(self.committed_shards()):
            name = index_part_name(i)
            h.update(name.encode())
            h.update(hashlib.sha256(self.loc.read_bytes(INDEX_DIR, name)).digest())
        return "sha256:" + h.hexdigest()

    def bytes_on_disk(self, committed_only: bool = True) -> dict[str, int]:
        """Stored bytes: ``total``, ``dataset_json``, ``index``, ``shards`` (all Zarr bytes), one entry
        per shard array (``x``, ``u``, each cond field, ...) and ``zarr_metadata`` (zarr.json files);
        ``samples`` is the number of samples counted. Only committed shards unless told otherwise."""
        committed, uncommitted = list_shards(self.loc)
        shards = committed if committed_only else committed + uncommitted
        out: dict[str, int] = {"dataset_json": self.loc.fs.size(self.loc.path(DATASET_JSON)), "index": 0, "shards": 0, "zarr_metadata": 0}
        for i in committed:
            out["index"] += self.loc.fs.size(self.loc.path(INDEX_DIR, index_part_name(i)))
        prefix_len = len(self.loc.path(SHARDS_DIR)) + 1
        for i in shards:
            base = self.loc.path(SHARDS_DIR, shard_zarr_name(i))
            for path, info in self.loc.fs.find(base, detail=True).items():
                size = int(info.get("size") or 0)
                rel = path[prefix_len:].split("/")  # shard-000001.zarr/<array>/... or .../zarr.json
                key = "zarr_metadata" if rel[-1] == "zarr.json" else rel[1]
                out[key] = out.get(key, 0) + size
                out["shards"] += size
        out["total"] = out["dataset_json"] + out["index"] + out["shards"]
        out["samples"] = sum(self.shard_sizes(committed).values()) if committed else 0
        return out

    def __repr__(self) -> str:
        return f"TrajectoryReader({self.url!r}, {self.spec.num_shards} shards planned)"


def _prompt_of(part, row: int) -> str:
    rows = part.column("row").to_numpy()
    pos = int(np.flatnonzero(rows == row)[0])
    return part.column("prompt")[pos].as_py()
