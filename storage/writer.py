"""Writing a trajectory dataset (format v2, see ``arcflow.storage.format``) with its commit protocol.

Commit protocol, per shard (docs/architecture.md, Format):

1. remove the shard's Parquet part if there is one (a rewrite un-commits first) and any stale
   (partial) Zarr group of that shard;
2. write the shard's Zarr group WHOLE, from this one process (zarr 3.1 loses data when two writers
   touch one group, so each shard must have exactly one writer at a time: the generator hands out
   shards, never samples, as units of work);
3. write the Parquet part, with the manifest of every object step 2 wrote, LAST and atomically: temp file + rename on local disks (the temp name starts
   with ``.`` so neither pyarrow's directory discovery nor our readers ever see it), one object write
   on object stores (``s3://``, ``gs://``: a PUT is atomic; nothing is renamed there).

A shard without its Parquet part does not exist for readers and is simply rewritten on resume.
Nothing here knows about models: arrays in (numpy or CPU torch), files out.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import math
import os
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from arcflow.storage import _io
from arcflow.core.errors import ArcflowError
from arcflow.storage.format import (
    AUTO_CHUNK_BYTES,
    DATASET_JSON,
    FLOAT8_MAX,
    DTYPE_ATTR,
    FORMAT_VERSION,
    GENERATION_KEY,
    INDEX_DIR,
    LOCK_FILE,
    MANIFEST_KEY,
    SHARDS_DIR,
    DatasetSpec,
    index_part_name,
    shard_zarr_name,
    short_value,
)
from arcflow.storage.reader import index_schema, list_shards, read_spec, readable_parts

_F16_MAX = float(np.finfo(np.float16).max)


def check_dataset_target(
    url: str,
    resume: bool = False,
    spec: DatasetSpec | None = None,
    generation: Mapping[str, Any] | None = None,
    storage_options: dict | None = None,
) -> DatasetSpec | None:
    """The one rule for whether a job may write a dataset at ``url``; returns the existing dataset's
    spec (a resume) or None (nothing there yet). Reads only: nothing on disk is touched.

    - No dataset there (missing or empty directory): allowed.
    - A dataset with the same settings: allowed only with ``resume=True``.
    - A dataset with different settings, an unreadable one, a file, or a non-empty directory that is
      not a dataset: ``ArcflowError`` (one line).

    Settings are compared with ``spec`` (the whole header but its descriptive fields) and with
    the job settings the generator records as ``extra["generation"]`` (``generation``, or those
    of ``spec``): the former lets a job be checked before its teacher is loaded, i.e. before its
    full spec is known. A requested setting of None is a default, resolved into the full spec and
    compared there; a recorded None (older datasets) is compared as the header's effective value
    of that name (e.g. ``guidance``). A refusal names the settings that differ, briefly.
    """
    loc = _io.Location(url, storage_options)
    loc.check_writable()
    if not loc.exists(DATASET_JSON):
        if loc.fs.exists(loc.root):
            if loc.fs.isfile(loc.root):
                raise ArcflowError(f"dataset path {url} is a file, not a directory")
            if set(loc.listdir_names()) - {LOCK_FILE}:
                raise ArcflowError(
                    f"{url} exists and is not an arcflow dataset (no {DATASET_JSON}); refusing to write into it"
                )
        return None
    existing = read_spec(loc)
    if existing.format_version != FORMAT_VERSION:
        raise ArcflowError(
            f"dataset {url} is format v{existing.format_version}; this arcflow writes v{FORMAT_VERSION} only "
            "(it still reads it): write to a new path"
        )
    if generation is None and spec is not None:
        generation = spec.extra.get(GENERATION_KEY)
    diffs = generation_diffs(existing, generation or {})
    if spec is not None:
        diffs += existing.diff(spec, skip=(f"extra.{GENERATION_KEY}",))
    diffs = list(dict.fromkeys(diffs))  # a setting and the header field it makes, said once
    if diffs:
        shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
        raise ArcflowError(
            f"dataset {url} already exists with different settings ({shown} [existing != requested]); "
            "use a new path, or the same settings to resume"
        )
    if not resume:
        done = len(list_shards(loc)[0])
        raise ArcflowError(
            f"dataset {url} already exists ({done} of {existing.num_shards} shards committed); "
            "resume it (--resume) or choose a new path"
        )
    return existing


def generation_diffs(existing: DatasetSpec, requested: Mapping[str, Any]) -> list[str]:
    """``key: recorded != requested`` for each job setting that differs from the one ``existing``
    recorded (nothing when it recorded none: a dataset not made by the generator)."""
    recorded = existing.extra.get(GENERATION_KEY)
    if not isinstance(recorded, dict):
        return []
    header = {**existing.extra, **existing.to_dict()}
    out = []
    for key in sorted(requested):
        new = requested[key]
        if new is None:  # a default: resolved in the full spec, and compared there
            continue
        old = recorded.get(key)
        if old is None:  # recorded unresolved (older arcflow): the header holds the effective value
            old = header.get(key)
        if old != new:
            out.append(f"{key}: {short_value(old)} != {short_value(new)}")
    return out


@contextlib.contextmanager
def dataset_lock(url: str, storage_options: dict | None = None) -> Iterator[None]:
    """Hold the dataset at ``url`` for one writing job: a second job on the same local dataset is
    refused with one line while this one runs. ``fcntl.flock`` on ``LOCK_FILE`` in the root, so
    the kernel releases it when the process dies, however it dies; the file is removed on release,
    and a root this lock had to create is removed again if nothing else was put in it. Object
    stores and other remote filesystems have no lock (their writers must not overlap: see
    docs/dataset_format.md)."""
    loc = _io.Location(url, storage_options)
    if not loc.is_local:
        yield
        return
    root = os.path.abspath(loc.root)
    made_root = not os.path.exists(root)
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, LOCK_FILE)
    fd = _acquire(path, url)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)  # while still held: a process waiting on this file then sees it replaced
        os.close(fd)
        if made_root:
            with contextlib.suppress(OSError):
                os.rmdir(root)  # only if empty: nothing was written


def _acquire(path: str, url: str) -> int:
    """An open descriptor of the lock file ``path``, exclusively locked; ArcflowError when another
    process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ArcflowError(
            f"dataset {url} is being written by another job (pid {holder}); wait for it to finish, or stop it"
        ) from None
    if os.fstat(fd).st_ino != _inode(path):  # its holder removed it as we opened it: that job is done
        os.close(fd)
        return _acquire(path, url)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def create_or_open_dataset(
    url: str, spec: DatasetSpec, resume: bool = False, storage_options: dict | None = None
) -> "DatasetWriter":
    """Create a new dataset at ``url`` (a path, ``file://``, ``memory://``, ``s3://bucket/prefix`` ...)
    or reopen an existing one to resume it, under the rules of :func:`check_dataset_target`.

    A resumed dataset keeps its committed shards (``DatasetWriter.pending_shards()`` lists what is
    left). ``storage_options`` go to fsspec (e.g. ``{"anon": False, "endpoint_url": ...}`` for s3fs).
    """
    if spec.format_version != FORMAT_VERSION:
        raise ArcflowError(f"this arcflow writes dataset format v{FORMAT_VERSION} only, not v{spec.format_version}")
    existing = check_dataset_target(url, resume, spec=spec, storage_options=storage_options)
    loc = _io.Location(url, storage_options)
    if existing is not None:
        return DatasetWriter(loc, existing)
    root_existed = bool(loc.fs.exists(loc.root))
    loc.write_atomic(spec.to_json().encode(), DATASET_JSON)
    loc.makedirs(SHARDS_DIR)
    loc.makedirs(INDEX_DIR)
    return DatasetWriter(loc, spec, created=True, root_existed=root_existed)


class DatasetWriter:
    """Writes whole shards of one dataset. Obtain with ``create_or_open_dataset``.

    Several processes may write DIFFERENT shards of one dataset concurrently; two writers must never
    write the same shard at the same time.
    """

    def __init__(self, loc: _io.Location, spec: DatasetSpec, created: bool = False, root_existed: bool = True):
        self.loc = loc
        self.spec = spec
        #: Whether this writer wrote ``dataset.json`` (a new dataset), and whether the root was there.
        self.created = created
        self._root_existed = root_existed

    @property
    def url(self) -> str:
        return self.loc.url

    def readable_shards(self) -> set[int]:
        """Committed shards whose Parquet part reads back whole. A damaged part (zero bytes, truncated,
        garbage) does not count: resuming rewrites that shard, which replaces the part."""
        return set(readable_parts(self.loc, list_shards(self.loc)[0], self.spec.steps))

    def discard(self) -> None:
        """Remove the dataset this writer created, if no shard was committed to it: its files, and the
        root too unless it existed (empty) before. Refused for data this writer did not create."""
        if not self.created:
            raise ArcflowError(f"refusing to discard {self.url}: this writer did not create it")
        if self.readable_shards():
            raise ArcflowError(f"refusing to discard {self.url}: it holds committed shards")
        if not self._root_existed:
            self.loc.rm_tree()
            return
        for name in (INDEX_DIR, SHARDS_DIR):
            self.loc.rm_tree(name)
        self.loc.rm_file(DATASET_JSON)

    def pending_shards(self) -> list[int]:
        """Shards of ``range(spec.num_shards)`` not committed yet, ascending: the work left to do."""
        done = self.readable_shards()
        return [i for i in range(self.spec.num_shards) if i not in done]

    def write_shard(
        self,
        shard_id: int,
        x,
        u,
        sigmas,
        cond: Mapping[str, object],
        sample_ids,
        seeds,
        prompts: Sequence[str],
        guidance: float | Sequence[float] | np.ndarray,
    ) -> int:
        """Write shard ``shard_id`` whole and commit it; returns its number of samples ``n``.

        ``x`` [n, S+1, *latent] and ``u`` [n, S, *latent] float (numpy or CPU torch, any float dtype;
        float32 expected), ``sigmas`` [S+1] (must match the spec's sigmas), ``cond[name]``
        [n, *shape] for every field of the spec's ``cond_spec`` (and nothing else), ``sample_ids`` and
        ``seeds`` [n] integers, ``prompts`` n strings, ``guidance`` a float or [n] floats.
        The index statistics are computed from these float32 values, before storage rounding.
        Rewriting a committed shard is allowed (it is un-committed first, then rewritten).
        """
        spec = self.spec
        shard_id = int(shard_id)
        spec.shard_samples(shard_id)  # range check
        S = spec.steps
        lat = spec.latent_shape
        x = _io.to_numpy(x, "x").astype(np.float32, copy=False)
        u = _io.to_numpy(u, "u").astype(np.float32, copy=False)
        n = x.shape[0] if x.ndim else 0
        if n < 1 or n > spec.shard_size:
            raise ArcflowError(f"shard {shard_id}: expected 1..{spec.shard_size} samples, got {n}")
        if x.shape != (n, S + 1, *lat):
            raise ArcflowError(f"shard {shard_id}: x has shape {tuple(x.shape)}, expected {(n, S + 1, *lat)}")
        if u.shape != (n, S, *lat):
            raise ArcflowError(f"shard {shard_id}: u has shape {tuple(u.shape)}, expected {(n, S, *lat)}")
        sig = _io.to_numpy(sigmas, "sigmas").astype(np.float64).reshape(-1)
        ref = np.asarray(spec.sigmas, dtype=np.float64)
        if sig.shape != ref.shape or not np.allclose(sig, ref, rtol=0, atol=1e-6):
            raise ArcflowError(f"shard {shard_id}: sigmas differ from the dataset's sigmas")
        ids = _io.to_numpy(sample_ids, "sample_ids").astype(np.int64).reshape(-1)
        sds = _io.to_numpy(seeds, "seeds").astype(np.int64).reshape(-1)
        if ids.shape != (n,) or sds.shape != (n,):
            raise ArcflowError(f"shard {shard_id}: sample_ids and seeds must hold {n} values each")
        if len(np.unique(ids)) != n:
            raise ArcflowError(f"shard {shard_id}: sample_ids are not unique")
        prompts = [str(p) for p in prompts]
        if len(prompts) != n:
            raise ArcflowError(f"shard {shard_id}: got {len(prompts)} prompts for {n} samples")
        g = np.broadcast_to(_io.to_numpy(guidance, "guidance").astype(np.float32), (n,)).copy()
        # min and max propagate NaN and reach any infinity: no temporary arrays of the shard's size
        bounds = {name: (float(a.min()), float(a.max())) for name, a in (("x", x), ("u", u))}
        for name, (lo, hi) in bounds.items():
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ArcflowError(f"shard {shard_id}: {name} holds NaN or infinite values (the teacher diverged?)")
        if spec.state_dtype == "float16":
            checked = bounds if spec.storage_dtype == "float16" else {"x": bounds["x"]}  # float8 u is scaled
            peak = max(max(-lo, hi) for lo, hi in checked.values())
            if peak > _F16_MAX:
                raise ArcflowError(
                    f"shard {shard_id}: values up to {peak:.3g} overflow float16; use storage dtype bfloat16 or float32"
                )
        if spec.keyframe_every > 1:
            check_euler_states(shard_id, x, u, ref)
        if set(cond) != set(spec.cond_spec):
            raise ArcflowError(
                f"shard {shard_id}: conditioning fields {sorted(cond)} differ from the dataset's {sorted(spec.cond_spec)}"
            )
        cond_np = {}
        for name, f in spec.cond_spec.items():
            a = _io.to_numpy(cond[name], name)
            if a.shape != (n, *f.shape):
                raise ArcflowError(f"shard {shard_id}: {name} has shape {tuple(a.shape)}, expected {(n, *f.shape)}")
            cond_np[name] = a

        # 1. un-commit and drop any stale/partial group of this shard
        self.loc.rm_file(INDEX_DIR, index_part_name(shard_id))
        self.loc.rm_tree(SHARDS_DIR, shard_zarr_name(shard_id))
        # 2. the Zarr group, whole, recording the manifest of what it wrote
        manifest = self._write_zarr(shard_id, self._shard_arrays(x, u, ref, cond_np, prompts, ids, sds, g))
        # 3. the Parquet part with the manifest, last and atomically: this commits the shard
        table = build_index_table(shard_id, x, u, ref, ids, sds, prompts, g)
        import pyarrow.parquet as pq

        from arcflow.storage.chunk_store import manifest_to_json

        table = table.replace_schema_metadata({MANIFEST_KEY: manifest_to_json(manifest)})

        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self.loc.write_atomic(buf.getvalue(), INDEX_DIR, index_part_name(shard_id))
        return n

    def _shard_arrays(self, x, u, sigmas, cond_np, prompts, ids, seeds, guidance) -> dict[str, tuple]:
        """The shard's arrays as stored: name -> (data, chunk shape, arcflow dtype attribute or None)."""
        spec = self.spec
        n, S = u.shape[:2]
        lat = spec.latent_shape
        cs = min(spec.samples_per_chunk, n)  # a short last shard gets no padded edge chunk
        sd, xd = spec.storage_dtype, spec.state_dtype
        keyframes = np.ascontiguousarray(x[:, list(spec.keyframe_steps)])
        arrays: dict[str, tuple] = {
            "x": (_io.encode_float(keyframes, xd), (cs, spec.keyframes_per_chunk, *lat), _bits_dtype(xd)),
        }
        if sd == "float8_e4m3":
            scale, bits = encode_float8_velocities(u)
            arrays["u"] = (bits, (cs, spec.steps_per_chunk, *lat), sd)
            arrays["u_scale"] = (scale, (cs, S), None)
        else:
            arrays["u"] = (_io.encode_float(u, sd), (cs, spec.steps_per_chunk, *lat), _bits_dtype(sd))
        rows, firsts = unique_condition_rows(cond_np, prompts)
        for name, a in cond_np.items():
            f = spec.cond_spec[name]
            a = a[firsts]
            row_bytes = max(1, a[0].nbytes)
            per_chunk = _equal_chunk(len(firsts), max(1, AUTO_CHUNK_BYTES // row_bytes))
            if f.is_floating:
                arrays[name] = (_io.encode_float(a.astype(np.float32, copy=False), xd), (per_chunk, *f.shape), _bits_dtype(xd))
            else:
                arrays[name] = (np.ascontiguousarray(a, dtype=f.dtype), (per_chunk, *f.shape), None)
        arrays["cond_row"] = (rows, (n,), None)
        arrays["sigmas"] = (np.asarray(sigmas, dtype=np.float64), (S + 1,), None)
        arrays["sample_id"] = (ids, (n,), None)
        arrays["seed"] = (seeds, (n,), None)
        arrays["guidance"] = (guidance, (n,), None)
        return arrays

    def _write_zarr(self, shard_id: int, arrays: dict[str, tuple]) -> dict[str, list]:
        """The shard's group, all arrays created and written in ONE trip to zarr's event loop: each
        synchronous zarr call is a thread hand-off, and in a generation worker every one of them
        takes the GIL from the teacher computing the next shard. Every chunk is written (even a
        constant one) and checksummed, so readers can tell damage from data; returns the manifest
        of every object written (``arcflow.storage.chunk_store``)."""
        import asyncio

        import zarr.api.asynchronous as zarr_async
        from zarr.core.sync import sync

        from arcflow.storage.chunk_store import RecordingStore

        spec = self.spec
        codecs = _io.zarr_compressors(spec.compression, spec.compression_level, checksum=True)
        store = RecordingStore(self.loc.zarr_store(SHARDS_DIR, shard_zarr_name(shard_id), read_only=False))
        n = len(arrays["sample_id"][0])
        attributes = {"format_version": FORMAT_VERSION, "shard": shard_id, "num_samples": n, "storage_dtype": spec.storage_dtype}

        async def write() -> None:
            group = await zarr_async.open_group(store=store, mode="w", zarr_format=3, attributes=attributes)

            async def put(name: str, data: np.ndarray, chunks, arcflow_dtype: str | None) -> None:
                arr = await group.create_array(
                    name,
                    shape=data.shape,
                    dtype=data.dtype,
                    chunks=chunks,
                    compressors=codecs,
                    fill_value=0,
                    config={"write_empty_chunks": True},
                    attributes={DTYPE_ATTR: arcflow_dtype} if arcflow_dtype else {},
                )
                await arr.setitem(Ellipsis, data)

            await asyncio.gather(*(put(name, *args) for name, args in arrays.items()))

        sync(write())
        return store.manifest


def _bits_dtype(storage_dtype: str) -> str | None:
    """The ``arcflow_dtype`` attribute of an array stored as raw bits (zarr lacks the dtype)."""
    return storage_dtype if storage_dtype in ("bfloat16", "float8_e4m3") else None


def _equal_chunk(total: int, target: int) -> int:
    """Chunk length splitting ``total`` into equal chunks of at most ``target`` (zarr pads edges)."""
    target = max(1, min(total, target))
    n_chunks = -(-total // target)
    return -(-total // n_chunks)


def encode_float8_velocities(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scale [n, S] float32, float8 e4m3fn bits of u / scale) with one scale per (sample, step):
    the step's largest magnitude maps to the largest finite float8 value (an all-zero step gets 1)."""
    n, S = u.shape[:2]
    peak = np.abs(u.reshape(n, S, -1)).max(axis=2)
    scale = np.where(peak > 0, peak / FLOAT8_MAX, 1.0).astype(np.float32)
    bits = np.empty(u.shape, np.uint8)
    for i in range(n):  # one sample at a time: no float32 temporary of the shard's size
        scaled = u[i] / scale[i].reshape(S, *([1] * (u.ndim - 2)))
        bits[i] = _io.encode_float(np.clip(scaled, -FLOAT8_MAX, FLOAT8_MAX), "float8_e4m3")
    return scale, bits


def unique_condition_rows(cond: Mapping[str, np.ndarray], prompts: Sequence[str]) -> tuple[np.ndarray, list[int]]:
    """(row of each sample [n] int32, first sample of each unique row): samples with the same prompt
    and identical conditioning share one stored row (several seeds per prompt is the usual set)."""
    rows = np.empty(len(prompts), np.int32)
    firsts: list[int] = []
    by_prompt: dict[str, list] = {}
    for i, p in enumerate(prompts):
        for r in by_prompt.setdefault(p, []):
            if all(np.array_equal(a[firsts[r]], a[i]) for a in cond.values()):
                rows[i] = r
                break
        else:
            rows[i] = len(firsts)
            by_prompt[p].append(len(firsts))
            firsts.append(i)
    return rows, firsts


def check_euler_states(shard_id: int, x: np.ndarray, u: np.ndarray, sigmas: np.ndarray) -> None:
    """Refuse states that are not Euler steps of the velocities (x_{j+1} = x_j - (s_j - s_{j+1}) u_j):
    format v2 rebuilds the states between keyframes that way, so it must hold to float32 rounding."""
    sig = np.asarray(sigmas, dtype=np.float32)
    steps = sig[:-1] - sig[1:]  # float32, as the recording sampler steps
    worst = 0.0
    for j in range(u.shape[1]):  # one step at a time: no temporary of the shard's size
        err = np.abs(x[:, j + 1] - (x[:, j] - steps[j] * u[:, j])).max()
        scale = 1.0 + max(float(np.abs(x[:, j + 1]).max()), float(steps[j] * np.abs(u[:, j]).max()))
        worst = max(worst, float(err) / scale)
    if worst > EULER_TOLERANCE:
        raise ArcflowError(
            f"shard {shard_id}: the states are not Euler steps of the velocities (relative deviation {worst:.2g}); "
            "store every state with keyframe_every=1"
        )


#: Largest relative deviation of a recorded state from the Euler step that check_euler_states accepts.
EULER_TOLERANCE = 1e-4


def build_index_table(shard_id, x, u, sigmas, ids, seeds, prompts, guidance):
    """The Parquet index rows of one shard (one per sample and step), stats from float32 ``x``/``u``."""
    import pyarrow as pa

    n, S1 = x.shape[:2]
    S = S1 - 1
    d = math.prod(x.shape[2:])
    xs = x[:, :S].reshape(n, S, d)
    us = u.reshape(n, S, d)
    # float64 accumulation without float64 copies of the shard (einsum casts in buffered blocks)
    xsq = np.einsum("nsd,nsd->ns", xs, xs, dtype=np.float64)
    usq = np.einsum("nsd,nsd->ns", us, us, dtype=np.float64)
    x_rms = np.sqrt(xsq / d)
    u_rms = np.sqrt(usq / d)
    u_cos = np.full((n, S), np.nan, np.float64)
    if S > 1:
        dots = np.einsum("nsd,nsd->ns", us[:, 1:], us[:, :-1], dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            u_cos[:, 1:] = dots / np.sqrt(usq[:, 1:] * usq[:, :-1])
    steps = np.tile(np.arange(S, dtype=np.int32), n)
    rows = np.repeat(np.arange(n, dtype=np.int32), S)
    cols = {
        "sample_id": np.repeat(ids, S),
        "shard": np.full(n * S, shard_id, np.int32),
        "row": rows,
        "step": steps,
        "sigma": np.asarray(sigmas, np.float64)[steps],
        "prompt": pa.array([p for p in prompts for _ in range(S)], pa.string()),
        "seed": np.repeat(seeds, S),
        "guidance": np.repeat(guidance.astype(np.float32), S),
        "x_rms": x_rms.reshape(-1).astype(np.float32),
        "u_rms": u_rms.reshape(-1).astype(np.float32),
        "u_cos_prev": u_cos.reshape(-1).astype(np.float32),
    }
    schema = index_schema()
    return pa.table([pa.array(cols[f.name], f.type) if not isinstance(cols[f.name], pa.Array) else cols[f.name] for f in schema], schema=schema)
