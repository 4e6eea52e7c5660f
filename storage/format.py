"""Trajectory dataset format (docs/architecture.md, Format): constants, the dataset spec, names.

Layout of a dataset (a local directory or any fsspec URL: ``file://``, ``memory://``, ``s3://``,
``gs://`` ...)::

    DATASET/
      dataset.json                 # this module's DatasetSpec.to_json(); format_version decides
      shards/shard-000123.zarr     # Zarr v3 group, one per shard, written whole by one process
      index/shard-000123.parquet   # per-step rows of that shard; its presence COMMITS the shard

Format version 2 (written by this arcflow; ``S`` = steps, ``K`` = ``keyframe_every``), for the
``n`` samples of a shard:

- ``u``        [n, S, *latent]  guided velocity of every step j: x_{j+1} = x_j - (s_j - s_{j+1}) u_j
- ``x``        [n, len(keyframe_steps), *latent]  the states at the KEYFRAMES only: step 0 (the
  noise), every K-th step and the final step S. A state between keyframes is rebuilt in float32 by
  summing Euler steps of the stored ``u`` from the keyframe before it (readers return all S+1 states
  as before; ``keyframe_every=1`` stores every state).
- ``u_scale``  [n, S] float32, only for storage dtype ``float8_e4m3``: ``u`` holds float8 e4m3fn
  bits (uint8) of ``u / u_scale``, one scale per (sample, step) = max|u| / 448.
- one array per conditioning field, [m, *shape]: the m UNIQUE rows of the shard (samples of the
  same prompt share one row), and ``cond_row`` [n] int32, each sample's row.
- ``sigmas`` [S+1] float64, ``sample_id`` [n] int64, ``seed`` [n] int64, ``guidance`` [n] float32.

Chunks run along the sample AND step axes: ``u`` in blocks of ``steps_per_chunk`` steps (a multiple
of K, or all S) of ``samples_per_chunk`` samples, ``x`` in the keyframes of the same blocks, so a
training segment reads its own blocks and not the rest of the trajectory. Every chunk of every array
ends with a CRC32C checksum (zarr's ``crc32c`` codec after compression) and is always written, even
when constant (``write_empty_chunks``), so readers treat a missing chunk as damage, never as zeros.

Dtypes: ``storage_dtype`` float32 / float16 / bfloat16 applies to ``u``, ``x`` and floating
conditioning; ``float8_e4m3`` stores ``u`` in 8 bits (with ``u_scale``) and ``x`` and the
conditioning in float16. Zarr 3.1 has neither bfloat16 nor float8, so those arrays hold the raw bits
(uint16 / uint8) and carry the array attribute ``arcflow_dtype``.

Format version 1 (still read, no longer written): ``x`` [n, S+1, *latent] holds every state,
conditioning is per sample, chunks run along the sample axis only and carry no checksum.

Each index part carries the shard's manifest (``MANIFEST_KEY`` in its Parquet key-value metadata:
size and BLAKE2b digest of every object of the Zarr group), so a chunk is bound to its place; readers
check objects against it when present (datasets written before it have none). A local dataset being
written holds ``LOCK_FILE`` (``fcntl.flock``) for the writing job.

The Parquet index has one row per (sample, step j in 0..S-1), columns ``INDEX_COLUMNS``. The
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

from arcflow.core.errors import ArcflowError, json_object

#: The version this arcflow writes; READABLE_VERSIONS are the ones it reads.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
STORAGE_DTYPES = ("float16", "float32", "bfloat16", "float8_e4m3")
#: Largest finite float8 e4m3fn value: velocities are scaled so each (sample, step) peaks there.
FLOAT8_MAX = 448.0
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
#: Key of ``DatasetSpec.extra`` holding a diffusers teacher's conditioning layout: how the stored
#: conditioning replays as transformer arguments (pipeline/conditioning_layout.py).
LAYOUT_KEY = "conditioning_layout"
#: Target size of one chunk of ``u`` when the chunk shape is left to auto (0).
AUTO_CHUNK_BYTES = 1 << 20
#: Default keyframe interval: NFE 2, 5 and 10 segment starts of 50 steps are stored exactly.
DEFAULT_KEYFRAME_EVERY = 5
#: Key of an index part's Parquet key-value metadata holding the shard's chunk manifest: JSON
#: ``{zarr key: [size, BLAKE2b digest]}`` of every object of the shard's Zarr group, recorded while the group
#: was written, so it commits with the part (see ``arcflow.storage.chunk_store``).
MANIFEST_KEY = "arcflow.manifest"
#: Lock file in a local dataset root, held (``fcntl.flock``) by the one job writing the dataset.
LOCK_FILE = ".arcflow.lock"
#: Fields that describe where the data came from, not what it is: not compared on resume (the
#: prompts' content is, as ``extra["prompts_sha256"]``).
DESCRIPTIVE_FIELDS = ("prompts_source",)
#: Longest value a settings difference quotes.
_DIFF_VALUE_CHARS = 40

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
    samples_per_chunk: int = 0  # 0: auto (about AUTO_CHUNK_BYTES per chunk of u), resolved here
    extra: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    keyframe_every: int = DEFAULT_KEYFRAME_EVERY  # v2; a v1 dataset stores every state (read as 1)
    steps_per_chunk: int = 0  # v2; 0: auto (all S steps, or K-step blocks when a step is large)

    def __post_init__(self) -> None:
        self.latent_shape = tuple(int(d) for d in self.latent_shape)
        self.sigmas = tuple(float(s) for s in np.asarray(self.sigmas, dtype=np.float64).reshape(-1))
        self.shift = float(self.shift)
        self.guidance = float(self.guidance)
        self.num_samples = int(self.num_samples)
        self.shard_size = int(self.shard_size)
        self.seed = int(self.seed)
        self.compression_level = int(self.compression_level)
        self.keyframe_every = int(self.keyframe_every)
        self.cond_spec = {str(k): _as_cond_field(k, v) for k, v in dict(self.cond_spec).items()}
        if self.format_version not in READABLE_VERSIONS:
            raise ArcflowError(
                f"dataset format_version {self.format_version} is not supported (this arcflow reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))})"
            )
        dtypes = STORAGE_DTYPES if self.format_version >= 2 else STORAGE_DTYPES[:3]
        if self.storage_dtype not in dtypes:
            raise ArcflowError(f"storage dtype must be one of {', '.join(dtypes)}, got {self.storage_dtype!r}")
        if self.compression not in COMPRESSIONS:
            raise ArcflowError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {self.compression!r}")
        if len(self.sigmas) < 2:
            raise ArcflowError(f"sigmas must hold steps+1 >= 2 values, got {len(self.sigmas)}")
        self._check_finite()
        if not self.latent_shape or min(self.latent_shape) <= 0:
            raise ArcflowError(f"latent shape must be non-empty and positive, got {self.latent_shape}")
        if self.shard_size <= 0:
            raise ArcflowError(f"shard size must be >= 1, got {self.shard_size}")
        if self.num_samples < 0:
            raise ArcflowError(f"num_samples must be >= 0, got {self.num_samples}")
        if self.format_version == 1:
            self.keyframe_every, self.steps_per_chunk = 1, self.steps
        elif self.keyframe_every < 1:
            raise ArcflowError(f"keyframe interval must be >= 1, got {self.keyframe_every}")
        else:  # an interval past the last step keeps just the noise and the final state
            self.keyframe_every = min(self.keyframe_every, self.steps)
        for name in self.cond_spec:
            if name in RESERVED_ARRAYS:
                raise ArcflowError(f"cond name {name!r} is reserved (reserved: {', '.join(RESERVED_ARRAYS)})")
        self._resolve_chunks()

    def _check_finite(self) -> None:
        """Refuse NaN or infinite sigmas or guidance (they would train a NaN student silently) and an
        infinite or non-positive shift; a NaN shift is the teacher's "no static shift" (a schedule
        no shift warp describes, see ``pipeline/diffusers_teachers.py``)."""
        bad = [i for i, s in enumerate(self.sigmas) if not math.isfinite(s)]
        if bad:
            raise ArcflowError(f"sigmas hold NaN or infinite values (at step {bad[0]})")
        if not math.isfinite(self.guidance):
            raise ArcflowError(f"guidance is {self.guidance}, not a finite number")
        if not (math.isnan(self.shift) or (math.isfinite(self.shift) and self.shift > 0)):
            raise ArcflowError(f"shift is {self.shift}, not a positive number (or NaN for none)")

    def _resolve_chunks(self) -> None:
        """Fill in auto (0) chunk sizes. Zarr v3 stores an edge chunk at full size, so a shard is split
        into EQUAL chunks (128 samples at a target of 80 -> 2 chunks of 64, not 80 + 48)."""
        if self.format_version == 1:  # every state, per-sample chunks
            per_sample = (self.steps + 1) * math.prod(self.latent_shape) * self.itemsize
        else:
            step_bytes = math.prod(self.latent_shape) * self.velocity_itemsize
            if self.steps_per_chunk <= 0:
                block = self.keyframe_every * step_bytes
                if self.steps * step_bytes <= AUTO_CHUNK_BYTES:
                    self.steps_per_chunk = self.steps
                else:  # blocks of whole keyframe intervals, as many as fit the target
                    self.steps_per_chunk = self.keyframe_every * max(1, AUTO_CHUNK_BYTES // block)
            self.steps_per_chunk = int(min(self.steps_per_chunk, self.steps))
            if self.steps_per_chunk != self.steps and self.steps_per_chunk % self.keyframe_every:
                raise ArcflowError(
                    f"steps per chunk ({self.steps_per_chunk}) must be a multiple of the keyframe interval "
                    f"({self.keyframe_every}) or all {self.steps} steps"
                )
            per_sample = self.steps_per_chunk * step_bytes
        if self.samples_per_chunk <= 0:
            target = max(1, min(self.shard_size, AUTO_CHUNK_BYTES // per_sample))
            n_chunks = -(-self.shard_size // target)
            self.samples_per_chunk = -(-self.shard_size // n_chunks)
        self.samples_per_chunk = int(min(self.samples_per_chunk, self.shard_size))

    # -- derived --------------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def state_dtype(self) -> str:
        """Dtype of the stored states (keyframes) and floating conditioning."""
        return "float16" if self.storage_dtype == "float8_e4m3" else self.storage_dtype

    @property
    def itemsize(self) -> int:
        """Bytes per stored state value."""
        return 4 if self.state_dtype == "float32" else 2

    @property
    def velocity_itemsize(self) -> int:
        return 1 if self.storage_dtype == "float8_e4m3" else self.itemsize

    @property
    def keyframe_steps(self) -> tuple[int, ...]:
        """Steps whose state is stored: 0, K, 2K, ... and S (every step in format v1)."""
        return tuple(sorted({*range(0, self.steps + 1, self.keyframe_every), self.steps}))

    @property
    def keyframes_per_chunk(self) -> int:
        """Keyframes per chunk of ``x``: those of one ``u`` block, or all of them for whole trajectories."""
        if self.steps_per_chunk >= self.steps:
            return len(self.keyframe_steps)
        return self.steps_per_chunk // self.keyframe_every

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
        if version not in READABLE_VERSIONS:
            raise ArcflowError(
                f"dataset format_version {version!r} is not supported (this arcflow reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))})"
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
        return cls.from_dict(json_object(text, DATASET_JSON))

    def diff(self, other: "DatasetSpec", skip: tuple[str, ...] = ()) -> list[str]:
        """Differences ``field: mine != other``, short (each value at most ~40 characters; dict fields
        such as ``extra`` compared key by key, e.g. ``extra.prompts_sha256``). Descriptive fields and
        the dotted names in ``skip`` are left out. Empty when the specs are the same."""
        a, b = _flatten(self.to_dict()), _flatten(other.to_dict())
        out = []
        for k in sorted(a.keys() | b.keys()):
            if k in DESCRIPTIVE_FIELDS or k in skip or any(k.startswith(s + ".") for s in skip):
                continue
            if a.get(k) != b.get(k) and not _both_nan(a.get(k), b.get(k)):
                mine, theirs = short_value(a.get(k)), short_value(b.get(k))
                out.append(f"{k}: {mine} != {theirs}" + (" (values differ)" if mine == theirs else ""))
        return out


def _both_nan(a: Any, b: Any) -> bool:
    """Two NaN floats (a schedule with no static shift records ``shift`` NaN): the same setting."""
    return isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)


def _flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{"extra": {"a": 1}}`` -> ``{"extra.a": 1}`` (lists and scalars are leaves)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def short_value(v: Any) -> str:
    """``repr(v)``, at most ~40 characters (a list longer than that as ``<N values>``)."""
    text = repr(v)
    if len(text) <= _DIFF_VALUE_CHARS:
        return text
    if isinstance(v, (list, tuple)):
        return f"<{len(v)} values>"
    return text[: _DIFF_VALUE_CHARS - 3] + "..."


#: Array names of a shard group that conditioning fields may not use.
RESERVED_ARRAYS = ("x", "u", "u_scale", "cond_row", "sigmas", "sample_id", "seed", "guidance")
