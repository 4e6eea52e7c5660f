"""A frozen copy of arcflow's trajectory dataset WRITER for format version 1, for benchmarks only.

The product writes format v2 only; the storage benchmarks still compare against v1, so the v1
layout lives on here, copied from ``arcflow.storage`` as of commit 72db7a5 (``DatasetSpec`` v1 JSON,
``DatasetWriter.write_shard`` / ``_write_zarr``, ``build_index_table``). What it writes is
byte-identical to that writer's output (tests/test_benchmarks_v1_writer.py checks it against the
v1 fixture tests/fixtures/v1_digits) and is read by arcflow's reader (``open_dataset``, which reads
v1) like any v1 dataset.

Self-contained on purpose: it imports only numpy, zarr, pyarrow and three helpers of
``arcflow.storage._io`` (``Location``, ``encode_float``, ``zarr_compressors``), never
``arcflow.storage.format`` / ``writer`` / ``reader``, so it keeps writing v1 whatever those become.
Not kept: resume, the commit-protocol checks of an existing target, ``discard``; a benchmark writes
a fresh dataset at a path it owns.

    from v1_writer import V1Spec, create_v1_dataset
    w = create_v1_dataset(url, V1Spec(teacher_id=..., latent_shape=..., sigmas=..., ...))
    w.write_shard(shard_id, x, u, sigmas, cond, sample_ids, seeds, prompts, guidance)  # as the product's
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from arcflow.storage._io import Location, encode_float, zarr_compressors

FORMAT_VERSION = 1
STORAGE_DTYPES = ("float16", "float32", "bfloat16")
COMPRESSIONS = ("zstd", "blosc-zstd", "none")
DATASET_JSON = "dataset.json"
SHARDS_DIR = "shards"
INDEX_DIR = "index"
DTYPE_ATTR = "arcflow_dtype"
AUTO_CHUNK_BYTES = 1 << 20
RESERVED_ARRAYS = ("x", "u", "sigmas", "sample_id", "seed", "guidance")
INDEX_COLUMNS: tuple[tuple[str, str], ...] = (
    ("sample_id", "int64"),
    ("shard", "int32"),
    ("row", "int32"),
    ("step", "int32"),
    ("sigma", "float64"),
    ("prompt", "string"),
    ("seed", "int64"),
    ("guidance", "float32"),
    ("x_rms", "float32"),
    ("u_rms", "float32"),
    ("u_cos_prev", "float32"),
)
_F16_MAX = float(np.finfo(np.float16).max)


class V1WriteError(ValueError):
    """A write the v1 writer refuses (bad shapes, values that overflow the storage dtype, ...)."""


def shard_name(shard_id: int) -> str:
    return f"shard-{int(shard_id):06d}"


def _cond_field(name: str, v: Any) -> tuple[tuple[int, ...], str]:
    if isinstance(v, Mapping):
        shape, dtype = v["shape"], v.get("dtype", "float32")
    elif hasattr(v, "shape") and hasattr(v, "dtype"):  # arcflow.storage.format.CondField
        shape, dtype = v.shape, v.dtype
    else:
        shape, dtype = v
    return tuple(int(d) for d in shape), str(dtype)


def _is_floating(dtype: str) -> bool:
    return dtype in ("float16", "float32", "float64", "bfloat16")


@dataclass
class V1Spec:
    """``DatasetSpec`` of format v1: the same fields, defaults, auto chunking and JSON."""

    teacher_id: str
    teacher_revision: str
    latent_shape: tuple[int, ...]
    sigmas: tuple[float, ...]
    shift: float
    guidance: float
    num_samples: int
    shard_size: int
    seed: int
    cond_spec: dict = field(default_factory=dict)  # name -> (shape, dtype) | {"shape", "dtype"}
    prompts_source: str = ""
    storage_dtype: str = "float16"
    compression: str = "blosc-zstd"
    compression_level: int = 3
    samples_per_chunk: int = 0
    extra: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self.latent_shape = tuple(int(d) for d in self.latent_shape)
        self.sigmas = tuple(float(s) for s in np.asarray(self.sigmas, dtype=np.float64).reshape(-1))
        self.shift, self.guidance = float(self.shift), float(self.guidance)
        self.num_samples, self.shard_size, self.seed = int(self.num_samples), int(self.shard_size), int(self.seed)
        self.compression_level = int(self.compression_level)
        self.cond_spec = {str(k): _cond_field(k, v) for k, v in dict(self.cond_spec).items()}
        if self.format_version != FORMAT_VERSION:
            raise V1WriteError(f"V1Spec writes format_version 1, got {self.format_version}")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise V1WriteError(f"v1 storage dtype must be one of {STORAGE_DTYPES}, got {self.storage_dtype!r}")
        if self.compression not in COMPRESSIONS:
            raise V1WriteError(f"compression must be one of {COMPRESSIONS}, got {self.compression!r}")
        if len(self.sigmas) < 2 or not self.latent_shape or self.shard_size <= 0 or self.num_samples < 0:
            raise V1WriteError("need >= 2 sigmas, a non-empty latent shape, shard_size >= 1, num_samples >= 0")
        reserved = sorted(set(self.cond_spec) & set(RESERVED_ARRAYS))
        if reserved:
            raise V1WriteError(f"cond names {reserved} are reserved")
        if self.samples_per_chunk <= 0:  # equal chunks of about AUTO_CHUNK_BYTES of x
            per_sample = (self.steps + 1) * math.prod(self.latent_shape) * self.itemsize
            target = max(1, min(self.shard_size, AUTO_CHUNK_BYTES // per_sample))
            n_chunks = -(-self.shard_size // target)
            self.samples_per_chunk = -(-self.shard_size // n_chunks)
        self.samples_per_chunk = int(min(self.samples_per_chunk, self.shard_size))

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def itemsize(self) -> int:
        return 4 if self.storage_dtype == "float32" else 2

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["latent_shape"] = list(self.latent_shape)
        d["sigmas"] = list(self.sigmas)
        d["cond_spec"] = {k: {"shape": list(s), "dtype": t} for k, (s, t) in sorted(self.cond_spec.items())}
        d["steps"] = self.steps
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: Mapping) -> "V1Spec":
        """From a v1 ``dataset.json`` dict (or any dict of these fields; ``steps`` is ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def create_v1_dataset(url: str, spec: V1Spec, storage_options: dict | None = None) -> "V1DatasetWriter":
    """Start a fresh v1 dataset at ``url`` (refused where anything is already there)."""
    loc = Location(url, storage_options)
    if loc.fs.exists(loc.root) and (loc.fs.isfile(loc.root) or loc.listdir_names()):
        raise V1WriteError(f"{url} exists and is not empty; the v1 benchmark writer only creates fresh datasets")
    loc.write_atomic(spec.to_json().encode(), DATASET_JSON)
    loc.makedirs(SHARDS_DIR)
    loc.makedirs(INDEX_DIR)
    return V1DatasetWriter(loc, spec)


def write_v1_dataset(url: str, spec: V1Spec, shards: Iterable[Mapping[str, Any]], storage_options: dict | None = None) -> V1Spec:
    """Write a whole v1 dataset: ``shards`` yields ``write_shard`` keyword dicts (``shard_id``, ``x``,
    ``u``, ``sigmas``, ``cond``, ``sample_ids``, ``seeds``, ``prompts``, ``guidance``)."""
    w = create_v1_dataset(url, spec, storage_options)
    for s in shards:
        w.write_shard(**s)
    return spec


def _f32(a, name: str) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensor (bfloat16 has no numpy twin)
        a = a.detach().cpu().float().numpy()
    return np.asarray(a).astype(np.float32, copy=False)


class V1DatasetWriter:
    """``DatasetWriter`` of format v1 (whole shards, Parquet part last = commit)."""

    def __init__(self, loc: Location, spec: V1Spec):
        self.loc, self.spec = loc, spec

    @property
    def url(self) -> str:
        return self.loc.url

    def write_shard(self, shard_id: int, x, u, sigmas, cond: Mapping[str, object], sample_ids, seeds,
                    prompts: Sequence[str], guidance) -> int:
        """As ``DatasetWriter.write_shard`` of format v1; returns the shard's number of samples."""
        spec, shard_id = self.spec, int(shard_id)
        if not 0 <= shard_id < spec.num_shards:
            raise V1WriteError(f"shard {shard_id} is out of range ({spec.num_shards} shards)")
        S, lat = spec.steps, spec.latent_shape
        x, u = _f32(x, "x"), _f32(u, "u")
        n = x.shape[0] if x.ndim else 0
        if not 1 <= n <= spec.shard_size or x.shape != (n, S + 1, *lat) or u.shape != (n, S, *lat):
            raise V1WriteError(f"shard {shard_id}: x {x.shape} / u {u.shape} do not fit n<= {spec.shard_size}, {S} steps, {lat}")
        sig = np.asarray(sigmas, dtype=np.float64).reshape(-1)
        ref = np.asarray(spec.sigmas, dtype=np.float64)
        if sig.shape != ref.shape or not np.allclose(sig, ref, rtol=0, atol=1e-6):
            raise V1WriteError(f"shard {shard_id}: sigmas differ from the dataset's sigmas")
        ids = np.asarray(sample_ids).astype(np.int64).reshape(-1)
        sds = np.asarray(seeds).astype(np.int64).reshape(-1)
        prompts = [str(p) for p in prompts]
        if ids.shape != (n,) or sds.shape != (n,) or len(prompts) != n or len(np.unique(ids)) != n:
            raise V1WriteError(f"shard {shard_id}: need {n} unique sample ids, {n} seeds and {n} prompts")
        g = np.broadcast_to(np.asarray(guidance, dtype=np.float32), (n,)).copy()
        bounds = {name: (float(a.min()), float(a.max())) for name, a in (("x", x), ("u", u))}
        for name, (lo, hi) in bounds.items():
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise V1WriteError(f"shard {shard_id}: {name} holds NaN or infinite values")
        if spec.storage_dtype == "float16" and max(max(-lo, hi) for lo, hi in bounds.values()) > _F16_MAX:
            raise V1WriteError(f"shard {shard_id}: values overflow float16")
        if set(cond) != set(spec.cond_spec):
            raise V1WriteError(f"shard {shard_id}: conditioning {sorted(cond)} != {sorted(spec.cond_spec)}")
        cond_np = {}
        for name, (shape, _) in spec.cond_spec.items():
            a = cond[name]
            a = a.detach().cpu().float().numpy() if hasattr(a, "detach") else np.asarray(a)
            if a.shape != (n, *shape):
                raise V1WriteError(f"shard {shard_id}: {name} has shape {a.shape}, expected {(n, *shape)}")
            cond_np[name] = a

        self.loc.rm_file(INDEX_DIR, shard_name(shard_id) + ".parquet")
        self.loc.rm_tree(SHARDS_DIR, shard_name(shard_id) + ".zarr")
        self._write_zarr(shard_id, x, u, ref, cond_np, ids, sds, g)
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(build_index_table(shard_id, x, u, ref, ids, sds, prompts, g), buf, compression="zstd")
        self.loc.write_atomic(buf.getvalue(), INDEX_DIR, shard_name(shard_id) + ".parquet")
        return n

    def _write_zarr(self, shard_id, x, u, sigmas, cond_np, ids, seeds, guidance) -> None:
        import asyncio

        import zarr.api.asynchronous as zarr_async
        from zarr.core.sync import sync

        spec = self.spec
        n = x.shape[0]
        cs = min(spec.samples_per_chunk, n)
        comp = zarr_compressors(spec.compression, spec.compression_level)
        store = self.loc.zarr_store(SHARDS_DIR, shard_name(shard_id) + ".zarr", read_only=False)
        sd = spec.storage_dtype
        arrays = {name: (encode_float(a, sd), (cs, *a.shape[1:]), sd, True) for name, a in (("x", x), ("u", u))}
        arrays["sigmas"] = (np.asarray(sigmas, dtype=np.float64), sigmas.shape, None, False)
        for name, a in cond_np.items():
            dtype = spec.cond_spec[name][1]
            if _is_floating(dtype):
                arrays[name] = (encode_float(a.astype(np.float32, copy=False), sd), (cs, *a.shape[1:]), sd, True)
            else:
                arrays[name] = (np.ascontiguousarray(a, dtype=dtype), (cs, *a.shape[1:]), None, True)
        arrays["sample_id"] = (ids, (n,), None, True)
        arrays["seed"] = (seeds, (n,), None, True)
        arrays["guidance"] = (guidance, (n,), None, True)

        async def write() -> None:
            group = await zarr_async.open_group(
                store=store, mode="w", zarr_format=3,
                attributes={"format_version": FORMAT_VERSION, "shard": shard_id, "num_samples": n, "storage_dtype": sd},
            )

            async def put(name, data, chunks, arcflow_dtype, compress) -> None:
                arr = await group.create_array(
                    name, shape=data.shape, dtype=data.dtype, chunks=chunks,
                    compressors=comp if compress else None, fill_value=0,
                    attributes={DTYPE_ATTR: arcflow_dtype} if arcflow_dtype else {},
                )
                await arr.setitem(Ellipsis, data)

            await asyncio.gather(*(put(name, *args) for name, args in arrays.items()))

        sync(write())


def index_schema():
    import pyarrow as pa

    types = {"int64": pa.int64(), "int32": pa.int32(), "float64": pa.float64(), "float32": pa.float32(), "string": pa.string()}
    return pa.schema([pa.field(n, types[t]) for n, t in INDEX_COLUMNS])


def build_index_table(shard_id, x, u, sigmas, ids, seeds, prompts, guidance):
    """The v1 Parquet index rows of one shard (one per sample and step), stats from float32 x/u."""
    import pyarrow as pa

    n, S1 = x.shape[:2]
    S = S1 - 1
    d = math.prod(x.shape[2:])
    xs = x[:, :S].reshape(n, S, d)
    us = u.reshape(n, S, d)
    xsq = np.einsum("nsd,nsd->ns", xs, xs, dtype=np.float64)
    usq = np.einsum("nsd,nsd->ns", us, us, dtype=np.float64)
    u_cos = np.full((n, S), np.nan, np.float64)
    if S > 1:
        dots = np.einsum("nsd,nsd->ns", us[:, 1:], us[:, :-1], dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            u_cos[:, 1:] = dots / np.sqrt(usq[:, 1:] * usq[:, :-1])
    steps = np.tile(np.arange(S, dtype=np.int32), n)
    cols = {
        "sample_id": np.repeat(ids, S),
        "shard": np.full(n * S, shard_id, np.int32),
        "row": np.repeat(np.arange(n, dtype=np.int32), S),
        "step": steps,
        "sigma": np.asarray(sigmas, np.float64)[steps],
        "prompt": pa.array([p for p in prompts for _ in range(S)], pa.string()),
        "seed": np.repeat(seeds, S),
        "guidance": np.repeat(guidance.astype(np.float32), S),
        "x_rms": np.sqrt(xsq / d).reshape(-1).astype(np.float32),
        "u_rms": np.sqrt(usq / d).reshape(-1).astype(np.float32),
        "u_cos_prev": u_cos.reshape(-1).astype(np.float32),
    }
    schema = index_schema()
    return pa.table([c if isinstance(c := cols[f.name], pa.Array) else pa.array(c, f.type) for f in schema], schema=schema)
