"""Trajectory dataset format, version 1 (DESIGN.md section 5): constants, the dataset spec, names.

Layout of a dataset (a local directory or any fsspec URL: ``file://``, ``memory://``, ``s3://``,
``gs://`` ...)::

    DATASET/
      dataset.json                 # this module's DatasetSpec.to_json()
      shards/shard-000123.zarr     # Zarr v3 group, one per shard, written whole by one process
      index/shard-000123.parquet   # per-step rows of that shard; its presence COMMITS the shard

A shard's Zarr group holds, for its ``n`` samples (``S`` = steps):

- ``x``       [n, S+1, *latent]  states x_0..x_S (x_0 is the initial noise at sigma=1)
- ``u``       [n, S, *latent]    guided velocity of step j: x_{j+1} = x_j - (s_j - s_{j+1}) u_j
- ``sigmas``  [S+1] float64      the sampler's sigmas, 1 -> 0 (identical in every shard)
- one array per conditioning field, [n, *shape]
- ``sample_id`` [n] int64, ``seed`` [n] int64, ``guidance`` [n] float32

Floating data (``x``, ``u`` and floating conditioning) is stored in the dataset's storage dtype
(float16, float32 or bfloat16). Zarr 3.1 has no bfloat16, so bfloat16 arrays hold the raw 16 bits as
``uint16`` and carry the array attribute ``arcflow_dtype: "bfloat16"``; readers view them back (and
return float32 by default). Arrays are chunked along the sample axis (``samples_per_chunk`` samples
per chunk, whole along every other axis), so one trajectory can be read without the whole shard.

The Parquet index has one row per (sample, step j in 0..S-1), columns ``INDEX_SCHEMA``. The
statistics ``x_rms``, ``u_rms`` (root mean square of x_j and u_j) and ``u_cos_prev`` (cosine between
u_j and u_{j-1}, NaN at j=0) are computed from the float32 arrays given to the writer, i.e. BEFORE
rounding to the storage dtype.

This module imports neither zarr nor torch.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Mapping

import numpy as np

from arcflow.storage.errors import ArcflowError

FORMAT_VERSION = 1
STORAGE_DTYPES = ("float16", "float32", "bfloat16")
#: "blosc-zstd" (default): zarr's BloscCodec(cname="zstd", byte shuffle), smallest on float data
#: (see benchmarks/storage_bytes.py); "zstd": plain ZstdCodec; "none": uncompressed.
COMPRESSIONS = ("zstd", "blosc-zstd", "none")

DATASET_JSON = "dataset.json"
SHARDS_DIR = "shards"
INDEX_DIR = "index"
#: Attribute marking a uint16 Zarr array that holds bfloat16 bits.
DTYPE_ATTR = "arcflow_dtype"
#: Key of ``DatasetSpec.extra`` where the generator records its job settings (compared before a
#: resume, when the full spec is not known yet).
GENERATION_KEY = "generation"
#: Target size of one chunk of ``x`` when ``samples_per_chunk`` is left to auto (0).
AUTO_CHUNK_BYTES = 1 << 20

_SHARD_RE = re.compile(r"^shard-(\d{6,})\.(zarr|parquet)$")

#: Columns of the Parquet index, in order, with their Arrow types (as strings, resolved lazily).
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


def shard_name(shard_id: int) -> str:
    """``shard-000123`` (at least 6 digits)."""
    if int(shard_id) < 0:
        raise ArcflowError(f"shard id must be >= 0, got {shard_id}")
    return f"shard-{int(shard_id):06d}"


def shard_zarr_name(shard_id: int) -> str:
    return shard_name(shard_id) + ".zarr"


def index_part_name(shard_id: int) -> str:
    return shard_name(shard_id) + ".parquet"


def parse_shard_name(name: str) -> int | None:
    """Shard id of ``shard-000123.zarr`` / ``shard-000123.parquet`` (a basename); None otherwise."""
    m = _SHARD_RE.match(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class CondField:
    """One conditioning array: per-sample ``shape`` and the dtype the generator produces.

    Floating fields are stored in the dataset's storage dtype; integer/bool fields as they are.
    """

    shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def is_floating(self) -> bool:
        return self.dtype in ("float16", "float32", "float64", "bfloat16")


def _as_cond_field(name: str, v: Any) -> CondField:
    if isinstance(v, CondField):
        f = v
    elif isinstance(v, Mapping):
        f = CondField(tuple(int(d) for d in v["shape"]), str(v.get("dtype", "float32")))
    elif isinstance(v, (tuple, list)) and len(v) == 2 and isinstance(v[1], str):
        f = CondField(tuple(int(d) for d in v[0]), v[1])
    else:
        raise ArcflowError(f"cond spec {name!r}: expected (shape, dtype) or {{'shape', 'dtype'}}, got {v!r}")
    f = CondField(tuple(int(d) for d in f.shape), f.dtype)
    if f.dtype != "bfloat16":
        try:
            np.dtype(f.dtype)
        except TypeError:
            raise ArcflowError(f"cond spec {name!r}: unknown dtype {f.dtype!r}") from None
    return f


@dataclass
class DatasetSpec:
    """Everything needed to reproduce a dataset and to validate a resume; stored as dataset.json.

    Two specs are "the same" (resume allowed) iff their JSON forms are equal, so put nothing
    run-specific (timestamps, hostnames) in here; ``extra`` is free-form JSON for the generator
    (e.g. ``{"true_cfg": true, "prompts_sha256": "..."}``) and takes part in the comparison.
    """

    teacher_id: str
    teacher_revision: str
    latent_shape: tuple[int, ...]
    sigmas: tuple[float, ...]  # S+1 values, 1 -> 0
    shift: float
    guidance: float
    num_samples: int
    shard_size: int
    seed: int
    cond_spec: dict[str, CondField] = field(default_factory=dict)
    prompts_source: str = ""
    storage_dtype: str = "float16"
    compression: str = "blosc-zstd"
    compression_level: int = 3
    samples_per_chunk: int = 0  # 0: auto (about AUTO_CHUNK_BYTES per chunk of x), resolved here
    extra: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self.latent_shape = tuple(int(d) for d in self.latent_shape)
        self.sigmas = tuple(float(s) for s in np.asarray(self.sigmas, dtype=np.float64).reshape(-1))
        self.shift = float(self.shift)
        self.guidance = float(self.guidance)
        self.num_samples = int(self.num_samples)
        self.shard_size = int(self.shard_size)
        self.seed = int(self.seed)
        self.compression_level = int(self.compression_level)
        self.cond_spec = {str(k): _as_cond_field(k, v) for k, v in dict(self.cond_spec).items()}
        if self.format_version != FORMAT_VERSION:
            raise ArcflowError(
                f"dataset format_version {self.format_version} is not supported (this arcflow reads version {FORMAT_VERSION})"
            )
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ArcflowError(f"storage dtype must be one of {', '.join(STORAGE_DTYPES)}, got {self.storage_dtype!r}")
        if self.compression not in COMPRESSIONS:
            raise ArcflowError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {self.compression!r}")
        if len(self.sigmas) < 2:
            raise ArcflowError(f"sigmas must hold steps+1 >= 2 values, got {len(self.sigmas)}")
        if not self.latent_shape or min(self.latent_shape) <= 0:
            raise ArcflowError(f"latent shape must be non-empty and positive, got {self.latent_shape}")
        if self.shard_size <= 0:
            raise ArcflowError(f"shard size must be >= 1, got {self.shard_size}")
        if self.num_samples < 0:
            raise ArcflowError(f"num_samples must be >= 0, got {self.num_samples}")
        for name in self.cond_spec:
            if name in RESERVED_ARRAYS:
                raise ArcflowError(f"cond name {name!r} is reserved (reserved: {', '.join(RESERVED_ARRAYS)})")
        if self.samples_per_chunk <= 0:
            # Zarr v3 stores an edge chunk at full size, so split the shard into EQUAL chunks of
            # about AUTO_CHUNK_BYTES (128 samples at a target of 80 -> 2 chunks of 64, not 80 + 48).
            per_sample = (self.steps + 1) * math.prod(self.latent_shape) * self.itemsize
            target = max(1, min(self.shard_size, AUTO_CHUNK_BYTES // per_sample))
            n_chunks = -(-self.shard_size // target)
            self.samples_per_chunk = -(-self.shard_size // n_chunks)
        self.samples_per_chunk = int(min(self.samples_per_chunk, self.shard_size))

    # -- derived --------------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def itemsize(self) -> int:
        return 4 if self.storage_dtype == "float32" else 2

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def shard_samples(self, shard_id: int) -> range:
        """Sample indices (0..num_samples-1) that shard ``shard_id`` holds."""
        if not 0 <= shard_id < self.num_shards:
            raise ArcflowError(f"shard {shard_id} is out of range (dataset has {self.num_shards} shards)")
        start = shard_id * self.shard_size
        return range(start, min(start + self.shard_size, self.num_samples))

    # -- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["latent_shape"] = list(self.latent_shape)
        d["sigmas"] = list(self.sigmas)
        d["cond_spec"] = {k: {"shape": list(v.shape), "dtype": v.dtype} for k, v in sorted(self.cond_spec.items())}
        d["steps"] = self.steps
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: Mapping) -> "DatasetSpec":
        d = dict(d)
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ArcflowError(
                f"dataset format_version {version!r} is not supported (this arcflow reads version {FORMAT_VERSION})"
            )
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing = sorted(required - d.keys())
        if missing:
            raise ArcflowError(f"dataset.json is missing {', '.join(missing)}")
        steps = d.pop("steps", None)
        spec = cls(**{k: v for k, v in d.items() if k in names})
        if steps is not None and int(steps) != spec.steps:
            raise ArcflowError(f"dataset.json says steps={steps} but holds {len(spec.sigmas)} sigmas")
        return spec

    @classmethod
    def from_json(cls, text: str | bytes) -> "DatasetSpec":
        try:
            d = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise ArcflowError(f"dataset.json is not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ArcflowError("dataset.json must hold a JSON object")
        return cls.from_dict(d)

    def diff(self, other: "DatasetSpec") -> list[str]:
        """Human-readable differences ``field: mine != other`` (empty when the specs are the same)."""
        a, b = self.to_dict(), other.to_dict()
        out = []
        for k in sorted(a.keys() | b.keys()):
            if a.get(k) != b.get(k):
                va, vb = a.get(k), b.get(k)
                if k == "sigmas":
                    va, vb = f"<{len(va)} values>", f"<{len(vb)} values, differing>"
                out.append(f"{k}: {va!r} != {vb!r}")
        return out


#: Array names of a shard group that conditioning fields may not use.
RESERVED_ARRAYS = ("x", "u", "sigmas", "sample_id", "seed", "guidance")
