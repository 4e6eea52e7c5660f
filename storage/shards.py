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


def damaged_array(url: str, shard_id: int, name: str, reason: object) -> ArcflowError:
    """The one-line error for a chunk or array of a committed shard that does not read back."""
    text = first_line(reason, 160) if isinstance(reason, BaseException) else str(reason)[:160]
    return ArcflowError(
        f"dataset {url}: shard {shard_id} array {name!r} is damaged ({text}); "
        f"run `arcflow verify {url} --repair`, then generate-trajectories --resume"
    )


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
    def open(cls, url: str, spec: DatasetSpec, shard_id: int, group) -> "ShardArrays":
        arrays, kinds = {}, {}
        for name in group.array_keys():
            try:
                arr = group[name]
            except Exception as exc:  # a deleted or garbled zarr.json
                raise damaged_array(url, shard_id, name, exc) from None
            arrays[name], kinds[name] = arr, arr.attrs.get(DTYPE_ATTR)
        shard = cls(url, spec, shard_id, arrays, kinds)
        for name in ("x", "u", "sample_id"):
            if name not in arrays:
                raise damaged_array(url, shard_id, name, "the array is missing")
        return shard

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
