"""Reading the arrays of one committed shard, whatever its format version: ``ShardArrays``.

Every read goes through here, so this is where format v2 is undone (states rebuilt from keyframes,
float8 velocities rescaled, conditioning rows expanded) and where damage becomes ONE error line
naming the dataset, the shard and the array. The arrays can be zarr arrays (windowed reads: only
the chunks a selection touches are fetched) or numpy arrays loaded whole (``load()``); both support
the same basic slicing, so the decoding code is the same for both.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from arcflow.storage import _io
from arcflow.core.errors import ArcflowError, first_line
from arcflow.storage.format import DTYPE_ATTR, DatasetSpec

#: Index columns ``ShardArrays.check_index`` compares with the arrays.
INDEX_CHECKED = ("sample_id", "shard", "row", "step", "sigma", "seed", "guidance")


def damaged_shard(url: str, shard_id: int, what: str) -> ArcflowError:
    """The one-line error for a committed shard that is damaged or disagrees with itself or with
    dataset.json; ``what`` completes "shard N ...". A resume alone would keep it (its index part
    reads back), so the advice is verify --repair first."""
    return ArcflowError(
        f"dataset {url}: shard {shard_id} {what}; "
        f"run `arcflow verify {url} --repair`, then generate-trajectories --resume"
    )


def damaged_array(url: str, shard_id: int, name: str, reason: object) -> ArcflowError:
    """The one-line error for a chunk or array of a committed shard that does not read back."""
    text = first_line(reason, 160) if isinstance(reason, BaseException) else str(reason)[:160]
    return damaged_shard(url, shard_id, f"array {name!r} is damaged ({text})")


def stored_dtype(dtype: str) -> str:
    """The zarr dtype an array of ``dtype`` is stored as (bfloat16 and float8 as raw bits)."""
    return {"bfloat16": "uint16", "float8_e4m3": "uint8"}.get(dtype, dtype)


def expected_layout(spec: DatasetSpec, n: int) -> dict[str, tuple[tuple[int | None, ...], str | None]]:
    """name -> (shape, stored dtype) that dataset.json implies for a shard of ``n`` samples; None in a
    shape is any length >= 1 (v2's unique conditioning rows), a None dtype is not checked (v1)."""
    S, lat, v2 = spec.steps, spec.latent_shape, spec.format_version >= 2
    states = stored_dtype(spec.state_dtype) if v2 else None
    out: dict[str, tuple[tuple[int | None, ...], str | None]] = {
        "x": ((n, len(spec.keyframe_steps) if v2 else S + 1, *lat), states),
        "u": ((n, S, *lat), stored_dtype(spec.storage_dtype) if v2 else None),
        "sigmas": ((S + 1,), "float64"),
        "sample_id": ((n,), "int64"),
        "seed": ((n,), "int64"),
        "guidance": ((n,), "float32"),
    }
    if spec.storage_dtype == "float8_e4m3":
        out["u_scale"] = ((n, S), "float32")
    if v2:
        out["cond_row"] = ((n,), "int32")
    for name, f in spec.cond_spec.items():
        dtype = states if f.is_floating else (f.dtype if v2 else None)
        out[name] = ((None if v2 else n, *f.shape), dtype)
    return out


def layout_problem(spec: DatasetSpec, arrays: dict) -> str | None:
    """What in the arrays' metadata disagrees with dataset.json (missing arrays, shapes, dtypes),
    as "array 'x' ..." text; None when all agree."""
    n = int(arrays["sample_id"].shape[0]) if "sample_id" in arrays else 0
    for name, (shape, dtype) in expected_layout(spec, n).items():
        if name not in arrays:
            return f"array {name!r} is missing"
        got = tuple(arrays[name].shape)
        if len(got) != len(shape) or any(e is not None and g != e for g, e in zip(got, shape)) or 0 in got:
            want = tuple("m" if e is None else e for e in shape)
            return f"array {name!r} has shape {got} but dataset.json implies {want}"
        if dtype is not None and str(arrays[name].dtype) != dtype:
            return f"array {name!r} is stored as {arrays[name].dtype} but dataset.json implies {dtype}"
    return None


def open_arrays(url: str, shard_id: int, group, names: Sequence[str]) -> tuple[dict, dict[str, str | None]]:
    """(name -> zarr array, name -> ``arcflow_dtype`` attribute) of a shard's ``group``, as stored."""
    arrays, kinds = {}, {}
    for name in names:
        try:
            arr = group[name]
        except Exception as exc:  # a deleted, garbled or altered zarr.json
            raise damaged_array(url, shard_id, name, exc) from None
        arrays[name], kinds[name] = arr, arr.attrs.get(DTYPE_ATTR)
    return arrays, kinds


class ShardArrays:
    """Decoded access to one committed shard. ``arrays`` maps names to zarr or numpy arrays as stored
    (``kinds[name]`` is the ``arcflow_dtype`` attribute: "bfloat16"/"float8_e4m3" for bit arrays)."""

    def __init__(self, url: str, spec: DatasetSpec, shard_id: int, arrays: dict, kinds: dict[str, str | None]):
        self.url, self.spec, self.shard_id = url, spec, shard_id
        self.arrays, self.kinds = arrays, kinds
        self.keyframes = np.asarray(spec.keyframe_steps)
        sig = np.asarray(spec.sigmas, dtype=np.float32)
        self.step_sizes = sig[:-1] - sig[1:]  # float32: the recording sampler's own step sizes

    @classmethod
    def open(cls, url: str, spec: DatasetSpec, shard_id: int, group, names: Sequence[str]) -> "ShardArrays":
        """The arrays ``names`` of a shard's zarr ``group``, their metadata checked against dataset.json."""
        arrays, kinds = open_arrays(url, shard_id, group, names)
        problem = layout_problem(spec, arrays)
        if problem is not None:
            raise damaged_shard(url, shard_id, problem)
        return cls(url, spec, shard_id, arrays, kinds)

    def check_values(self) -> None:
        """Read the shard's small arrays and refuse what disagrees with dataset.json or points
        outside the shard: its sigmas, its conditioning rows."""
        sigmas = self.read("sigmas")
        if not np.allclose(sigmas, self.spec.sigmas, rtol=0, atol=1e-6):
            raise damaged_shard(self.url, self.shard_id, "array 'sigmas' disagrees with dataset.json's sigmas")
        if "cond_row" in self.arrays and self.spec.cond_spec:
            rows = self.read("cond_row")
            stored = min(int(self.arrays[name].shape[0]) for name in self.spec.cond_spec)
            if rows.size and (rows.min() < 0 or rows.max() >= stored):
                raise damaged_shard(self.url, self.shard_id, f"array 'cond_row' points outside the {stored} stored rows")

    def check_index(self, part) -> None:
        """Refuse an index part (a pyarrow table with at least ``INDEX_CHECKED`` columns) that does not
        describe exactly this shard's samples: its shard column, (row, step) pairs in order, sample
        ids, seeds, guidance and sigmas."""
        S, n = self.spec.steps, self.num_samples
        if part.num_rows != n * S:
            raise damaged_shard(self.url, self.shard_id, f"index has {part.num_rows} rows for {n} samples of {S} steps")
        step = np.tile(np.arange(S), n)
        expected = {
            "shard": np.full(n * S, self.shard_id),
            "row": np.repeat(np.arange(n), S),
            "step": step,
            "sample_id": np.repeat(self.read("sample_id"), S),
            "seed": np.repeat(self.read("seed"), S),
            "guidance": np.repeat(self.read("guidance"), S),
        }
        for name, want in expected.items():
            got = part.column(name).to_numpy(zero_copy_only=False)
            bad = np.flatnonzero(got != want)
            if bad.size:
                i = int(bad[0])
                raise damaged_shard(self.url, self.shard_id, f"index row {i} has {name} {got[i]}, the arrays say {want[i]}")
        sigma = part.column("sigma").to_numpy(zero_copy_only=False)
        if not np.allclose(sigma, np.asarray(self.spec.sigmas)[step], rtol=0, atol=1e-6):
            raise damaged_shard(self.url, self.shard_id, "index sigmas disagree with dataset.json's sigmas")

    @property
    def num_samples(self) -> int:
        return int(self.arrays["sample_id"].shape[0])

    def nbytes_stored(self, names: Sequence[str]) -> int:
        """Bytes of arrays ``names`` as stored, uncompressed (what :meth:`load` would hold)."""
        return sum(int(np.prod(self.arrays[n].shape)) * np.dtype(self.arrays[n].dtype).itemsize for n in names)

    def read(self, name: str, selection=Ellipsis) -> np.ndarray:
        """``arrays[name][selection]`` as stored, with damage turned into one line."""
        try:
            a = self.arrays[name]
            # a loaded (numpy) shard hands out copies: callers decode in place and keep what they get
            return np.array(a[selection]) if isinstance(a, np.ndarray) else np.asarray(a[selection])
        except KeyError:
            raise damaged_array(self.url, self.shard_id, name, "the array is missing") from None
        except Exception as exc:  # crc32c mismatch, truncated chunk, missing chunk, codec errors
            raise damaged_array(self.url, self.shard_id, name, exc) from None

    def load(self, names: Sequence[str] | None = None) -> "ShardArrays":
        """A copy of this shard with ``names`` (default: all) read whole into memory; the other
        arrays stay windowed."""
        names = list(self.arrays) if names is None else [n for n in names if n in self.arrays]
        arrays = {n: (self.read(n) if n in names else a) for n, a in self.arrays.items()}
        return ShardArrays(self.url, self.spec, self.shard_id, arrays, dict(self.kinds))

    # -- decoded pieces --------------------------------------------------------------------------
    def velocities(self, rows, start: int, stop: int) -> np.ndarray:
        """float32 ``u`` of samples ``rows`` (an int or a sorted index array) for steps start..stop-1."""
        u = _io.decode_float(self.read("u", (rows, slice(start, stop))), self.kinds.get("u"))
        if "u_scale" in self.arrays:
            scale = self.read("u_scale", (rows, slice(start, stop)))
            u *= scale.reshape(*scale.shape, *([1] * (u.ndim - scale.ndim)))
        return u

    def _keyframe(self, rows, step: int) -> tuple[int, np.ndarray]:
        """(keyframe step <= ``step``, its float32 state)."""
        k = int(np.searchsorted(self.keyframes, step, side="right")) - 1
        x = _io.decode_float(self.read("x", (rows, k)), self.kinds.get("x")).astype(np.float32, copy=True)
        return int(self.keyframes[k]), x

    def _advance(self, x: np.ndarray, u: np.ndarray, first_step: int, axis: int) -> np.ndarray:
        """Euler-step ``x`` in place through the velocities ``u`` (steps first_step.. along ``axis``)."""
        for i in range(u.shape[axis]):
            x -= self.step_sizes[first_step + i] * np.take(u, i, axis=axis)
        return x

    def segment(self, row: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(state x_start [*latent], velocities u_start..u_{stop-1} [stop-start, *latent]), float32, of one
        sample, reading only the chunks that hold them: the keyframe at or before ``start`` and the
        velocity blocks from there to ``stop``."""
        k, x = self._keyframe(row, start)
        if stop <= k:  # a keyframe on its own
            return x, np.zeros((0, *x.shape), np.float32)
        u = self.velocities(row, k, stop)
        self._advance(x, u[: start - k], k, axis=0)
        return x, u[start - k:]

    def state(self, row: int, step: int) -> np.ndarray:
        """float32 state x_step [*latent] of one sample."""
        return self.segment(row, step, step)[0]

    def trajectories(self, rows) -> tuple[np.ndarray, np.ndarray]:
        """(x [n, S+1, *latent], u [n, S, *latent]) float32 of samples ``rows`` (index array)."""
        S = self.spec.steps
        u = self.velocities(rows, 0, S)
        keys = _io.decode_float(self.read("x", (rows, slice(None))), self.kinds.get("x"))
        x = np.empty((u.shape[0], S + 1, *u.shape[2:]), np.float32)
        for i, k in enumerate(self.keyframes):
            x[:, k] = keys[:, i]
            nxt = self.keyframes[i + 1] if i + 1 < len(self.keyframes) else k
            cur = x[:, k].copy()
            for j in range(k, nxt - 1):  # states strictly between this keyframe and the next
                cur -= self.step_sizes[j] * u[:, j]
                x[:, j + 1] = cur
        return x, u

    def conditioning(self, rows, names: Sequence[str]) -> dict[str, np.ndarray]:
        """Each conditioning field of samples ``rows`` (floating ones as float32)."""
        if "cond_row" not in self.arrays:  # v1: one row per sample
            return {name: self._decoded(name, self.read(name, rows)) for name in names}
        ref = self.read("cond_row", rows)  # v2: unique rows, referenced per sample
        want = np.unique(ref)
        where = np.searchsorted(want, ref)
        return {name: self._decoded(name, self.read(name, want))[where] for name in names}

    def _decoded(self, name: str, a: np.ndarray) -> np.ndarray:
        return _io.decode_float(a, self.kinds.get(name)) if self.kinds.get(name) or a.dtype.kind == "f" else a

    def metadata(self, rows) -> dict[str, np.ndarray]:
        """``sample_id`` and ``seed`` (int64) and ``guidance`` (float32) of samples ``rows``."""
        return {name: self.read(name, rows) for name in ("sample_id", "seed", "guidance")}
