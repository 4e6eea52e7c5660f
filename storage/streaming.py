"""Streaming the committed shards of a trajectory dataset into torch: ``TrajectoryStream``.

Items. The stream yields what the offline loss uses: one item per (sample, segment), where the
segments are the step ranges ``segment_bounds`` (``[0, 25, 50]`` for NFE 2 over 50 steps; default
one segment over the whole trajectory) or, anywhere on the schedule, the sigma ranges
``segment_sigmas`` (NFE 3 over 50 steps begins its second segment inside step 16). A boundary
between two recorded steps is exact, not interpolated: the recorded path is the sampler's Euler
path, linear in sigma within a step, so the state there is ``x_j - (sigma_j - s) u_j`` and the
segment's first and last sub-steps are the parts of steps ``j`` inside it. An item is a dict of
CPU tensors:

- ``x`` [*latent] float32: the state at the segment start; ``sigma``: its sigma (float32 scalar);
- ``u`` [W, *latent] float32: the recorded velocities of the segment's sub-steps, ``sigmas``
  [W+1]: the sub-step sigmas, ``weights`` [W]: sub-step length / segment length. ``W`` is the
  most sub-steps of any segment, shorter ones are padded with zero-weight steps (and repeated end
  sigmas), so items of different segments batch together;
- ``segment`` (int64), each conditioning field (floating ones float32), ``sample_id``, ``seed``
  (int64), ``guidance`` (float32) and ``stream_pos`` (int64 [4]: worker id, worker count, epoch,
  position in the epoch: bookkeeping for resuming);
- with ``endpoints=True`` also ``noise`` (x at sigma=1) and ``final`` (x at sigma=0), for
  evaluation-style consumers.

Reads. An item reads only its own chunks (format v2: the keyframe at or before the segment start
and the velocity blocks of the segment) unless its shard is small: a shard whose stored arrays fit
``cache_bytes`` is read whole once and its items are cut from memory (digits-sized data: one read
instead of hundreds). So a worker holds at most ``cache_bytes`` of shard data, plus one item, plus
the shuffle buffer, whatever the shard size.

Splitting. The stream of one process (``rank`` of ``world_size``, e.g. Ray Train / DDP ranks) is
split further across its DataLoader workers: the dataset's shards are the units, and in epoch ``e``
the shard list (shuffled with ``(seed, e)``) is dealt round-robin to the ``world_size * W``
consumers (``W`` = DataLoader workers, 1 without workers). So in every epoch each committed
(sample, segment) is seen exactly once across all ranks and workers. Ranks can get different item
counts (shards differ in size, and the counts need not divide): with DDP prefer an infinite stream
(``epochs=None``) and a fixed number of optimizer steps.

Shuffling (``shuffle=True``). Per epoch: shard order as above; each shard's items in a random
permutation; then a bounded shuffle buffer of ``shuffle_buffer`` items mixes consecutive shards of
a consumer. The buffer holds references; an item buffered past its shard is cut out when the shard
is left (small shards) or read from its chunks when it is emitted (large ones). Everything is a pure
function of ``(seed, epoch, consumer)``: deterministic per seed, different between epochs.

Resuming. ``state_dict()`` is small (epoch and position per worker) and goes into checkpoints;
``load_state_dict()`` before iterating makes the stream continue exactly where the consumed items
stopped, i.e. a resumed run sees the same sequence as an uninterrupted one, at ITEM granularity:

- ``num_workers=0``: the stream tracks what it yielded by itself; nothing else to do.
- ``num_workers>0``: the worker copies cannot report back, so call ``stream.mark_consumed(batch)``
  for each batch the training loop has taken (it reads ``batch["stream_pos"]``). Items prefetched
  by workers but not consumed are produced again after a resume, as they should be. The resumed
  DataLoader must use the same ``num_workers`` (it changes the split; iterating with another count
  raises ``ArcflowError``) and the same ``batch_size``; then the batch sequence is the same as
  uninterrupted (tested), because the worker whose batch was due next is made to go first. This
  relies on DataLoader's default in-order round robin (``in_order=True``) and on each batch coming
  from one worker, which is how DataLoader batches an IterableDataset.

Every ``iter()`` of the stream starts from the loaded state (or from the beginning), so iterating
twice without ``load_state_dict`` replays the same sequence.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from arcflow.storage import _io
from arcflow.core.errors import ArcflowError
from arcflow.storage.reader import TrajectoryReader, open_dataset
from arcflow.storage.shards import ShardArrays

STATE_VERSION = 2
#: Shards whose stored arrays fit this many bytes are read whole (see the module docstring).
DEFAULT_CACHE_BYTES = 64 << 20
#: Small per-sample arrays read whole even when a shard's data is read item by item.
_SMALL_ARRAYS = ("sample_id", "seed", "guidance", "cond_row", "u_scale")


class TrajectoryStream(IterableDataset):
    """An ``IterableDataset`` of (sample, segment) items over a dataset's COMMITTED shards.

    ``segment_bounds``: increasing step indices from 0 to the dataset's steps (default ``[0, S]``:
    one segment per sample); or ``segment_sigmas``: decreasing sigmas from the dataset's first to its
    last (boundaries anywhere on the schedule). ``rank``/``world_size`` default to ``torch.distributed``'s when it is
    initialized, else 0/1. ``epochs=None`` iterates forever; an int stops after that many epochs
    (per consumer). ``shards`` restricts the stream to some committed shards (default: all committed
    at construction). ``cond`` selects the conditioning fields to yield (default: all).
    """

    def __init__(
        self,
        url: str,
        *,
        segment_bounds: Sequence[int] | None = None,
        segment_sigmas: Sequence[float] | None = None,
        endpoints: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 64,
        epochs: int | None = None,
        shards: Sequence[int] | None = None,
        cond: Sequence[str] | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        storage_options: dict | None = None,
    ):
        super().__init__()
        if rank is None or world_size is None:
            dist = torch.distributed
            if dist.is_available() and dist.is_initialized():
                rank = dist.get_rank() if rank is None else rank
                world_size = dist.get_world_size() if world_size is None else world_size
            else:
                rank = 0 if rank is None else rank
                world_size = 1 if world_size is None else world_size
        if not (world_size >= 1 and 0 <= rank < world_size):
            raise ArcflowError(f"rank {rank} is out of range for world size {world_size}")
        if epochs is not None and epochs < 1:
            raise ArcflowError(f"epochs must be >= 1 or None (forever), got {epochs}")
        self.url = str(url)
        self.storage_options = storage_options
        reader = open_dataset(self.url, storage_options)
        self.spec = reader.spec
        self.shards = reader.require_committed_shards(shards)
        if not self.shards:  # an empty selection
            raise ArcflowError("TrajectoryStream needs at least one shard")
        self.sizes = reader.shard_sizes(self.shards)
        names = list(self.spec.cond_spec) if cond is None else list(cond)
        unknown = sorted(set(names) - set(self.spec.cond_spec))
        if unknown:
            raise ArcflowError(f"dataset {self.url} has no conditioning field(s) {unknown}")
        self.cond_names = names
        self._sigmas = np.asarray(self.spec.sigmas, dtype=np.float32)  # the sampler's own float32 sigmas
        self._cuts = _segment_cuts(np.asarray(self.spec.sigmas, dtype=np.float64), segment_bounds, segment_sigmas)
        self.endpoints = bool(endpoints)
        self.cache_bytes = int(cache_bytes)
        self.rank, self.world_size = int(rank), int(world_size)
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.shuffle_buffer = max(0, int(shuffle_buffer))
        self.epochs = epochs
        self._reader: TrajectoryReader | None = None
        self._num_workers: int | None = None  # worker count the positions refer to
        self._start: dict[int, tuple[int, int]] = {}
        self._consumed: dict[int, tuple[int, int]] = {}
        self._offset = 0  # logical id of the worker whose batch is due first

    # -- sizes ----------------------------------------------------------------------------------
    @property
    def num_segments(self) -> int:
        return len(self._cuts)

    @property
    def width(self) -> int:
        """Sub-steps per item (the most of any segment; shorter ones are zero-weight padded)."""
        return max(cut.stop - cut.start for cut in self._cuts)

    # -- planning (pure functions of seed, epoch, consumer; no I/O) -------------------------------
    def _consumer_shards(self, epoch: int, consumer: int, consumers: int) -> list[int]:
        order = list(self.shards)
        if self.shuffle:
            order = [order[i] for i in np.random.default_rng([self.seed, epoch]).permutation(len(order))]
        return order[consumer::consumers]

    def _events(self, epoch: int, consumer: int, consumers: int) -> Iterator[tuple]:
        """("load", s) | ("emit", s, item) | ("retain", s, items still buffered when leaving shard s);
        item ``i`` of a shard is sample row ``i // num_segments``, segment ``i % num_segments``."""
        rng = np.random.default_rng([self.seed, epoch, consumers, consumer, 1])
        cap = self.shuffle_buffer if self.shuffle else 0
        buf: list[tuple[int, int]] = []
        for s in self._consumer_shards(epoch, consumer, consumers):
            n = self.sizes[s] * self.num_segments
            items = rng.permutation(n) if self.shuffle else np.arange(n)
            yield ("load", s)
            for i in items.tolist():
                if cap == 0:
                    yield ("emit", s, i)
                elif len(buf) < cap:
                    buf.append((s, i))
                else:
                    j = int(rng.integers(cap))
                    out, buf[j] = buf[j], (s, i)
                    yield ("emit", *out)
            yield ("retain", s, [i for (t, i) in buf if t == s])
        for j in rng.permutation(len(buf)).tolist():
            yield ("emit", *buf[j])

    # -- iteration ------------------------------------------------------------------------------
    def _worker(self) -> tuple[int, int]:
        """(logical worker id, worker count). DataLoader worker ``k`` plays logical worker
        ``(k + offset) % W``: after a resume, the worker whose batch was due next goes first (a new
        DataLoader always starts its round robin at worker 0)."""
        info = get_worker_info()
        if info is None:
            return 0, 1
        return (info.id + self._offset) % info.num_workers, info.num_workers

    def __iter__(self) -> Iterator[dict]:
        wid, nw = self._worker()
        if self._start and self._num_workers is not None and self._num_workers != nw:
            raise ArcflowError(
                f"stream state was saved with {self._num_workers} DataLoader worker(s) per rank but this run uses {nw}; "
                "resume with the same num_workers"
            )
        consumers = self.world_size * nw
        consumer = self.rank * nw + wid
        if not self._consumer_shards(0, consumer, consumers):
            return  # more consumers than shards: this one has nothing, ever
        if self._reader is None:
            self._reader = TrajectoryReader(_io.Location(self.url, self.storage_options), self.spec)
        self._num_workers = nw
        epoch0, pos0 = self._start.get(wid, (0, 0))
        epochs = itertools.count(epoch0) if self.epochs is None else range(epoch0, self.epochs)
        in_worker = get_worker_info() is not None
        for epoch in epochs:
            events = self._events(epoch, consumer, consumers)
            current: tuple[ShardArrays, bool] | None = None  # (the shard being read, read whole?)
            held: dict[tuple[int, int], dict | ShardArrays] = {}  # buffered items of shards left behind
            pos = 0
            if epoch == epoch0 and pos0 > 0:
                current, held, pos = self._fast_forward(events, pos0)
            for ev in events:
                if ev[0] == "load":
                    current = self._open(ev[1])
                elif ev[0] == "retain":
                    shard, whole = current
                    for i in ev[2]:  # cut out of memory now, or read from the chunks later
                        held[(ev[1], i)] = self._item(shard, i) if whole else shard
                    current = None
                else:
                    source = held.pop((ev[1], ev[2]), None)
                    item = source if isinstance(source, dict) else self._item(source or current[0], ev[2])
                    item["stream_pos"] = torch.tensor([wid, nw, epoch, pos], dtype=torch.int64)
                    pos += 1
                    if not in_worker:
                        self._consumed[wid] = _next_pos(epoch, pos)
                    yield item

    def _fast_forward(self, events: Iterator[tuple], target: int):
        """Advance ``events`` past ``target`` emissions without reading data; returns the shard being
        read then, the buffered items of earlier shards and the position reached."""
        pos, current, kept = 0, None, set()
        while pos < target:
            ev = next(events, None)
            if ev is None:
                break
            if ev[0] == "load":
                current = ev[1]
            elif ev[0] == "retain":
                kept.update((ev[1], i) for i in ev[2])
                current = None
            else:
                kept.discard((ev[1], ev[2]))
                pos += 1
        held: dict[tuple[int, int], dict | ShardArrays] = {}
        for s in sorted({s for s, _ in kept}):
            shard, whole = self._open(s)
            for t, i in kept:
                if t == s:
                    held[(s, i)] = self._item(shard, i) if whole else shard
        return (self._open(current) if current is not None else None), held, pos

    def _array_names(self) -> list[str]:
        return ["x", "u", "u_scale", "cond_row", *self.cond_names, "sample_id", "seed", "guidance"]

    def _open(self, shard_id: int) -> tuple[ShardArrays, bool]:
        """(the shard, True when it was read whole into memory); small arrays are always read whole."""
        shard = self._reader.shard(shard_id)
        names = [n for n in self._array_names() if n in shard.arrays]
        whole = shard.nbytes_stored(names) <= self.cache_bytes
        return shard.load(names if whole else [n for n in _SMALL_ARRAYS if n in shard.arrays]), whole

    def _item(self, shard: ShardArrays, index: int) -> dict:
        """The training item ``index`` (sample row, segment) of a shard, as CPU tensors."""
        row, segment = divmod(index, self.num_segments)
        cut = self._cuts[segment]
        x, u = shard.segment(row, cut.start, cut.stop)
        if cut.lead:  # the segment starts inside step ``start``: the Euler path's state there
            x -= cut.lead * u[0]
        width = self.width
        padded = np.zeros((width, *u.shape[1:]), np.float32)
        padded[: cut.stop - cut.start] = u
        window = self._window(cut, width)
        rows = slice(row, row + 1)
        item = {
            "x": torch.from_numpy(x),
            "sigma": torch.tensor(window[0]),
            "sigmas": torch.from_numpy(window),
            "u": torch.from_numpy(padded),
            "weights": torch.from_numpy((window[:-1] - window[1:]) / (window[0] - window[-1])),
            "segment": torch.tensor(segment, dtype=torch.int64),
        }
        if self.endpoints:
            item["noise"] = torch.from_numpy(shard.state(row, 0))
            item["final"] = torch.from_numpy(shard.state(row, self.spec.steps))
        for name, value in {**shard.conditioning(rows, self.cond_names), **shard.metadata(rows)}.items():
            value = np.array(value[0])
            item[name] = torch.from_numpy(value) if value.ndim else torch.tensor(value.item(), dtype=_torch_dtype(value.dtype))
        return item

    def _window(self, cut: "_Cut", width: int) -> np.ndarray:
        """The ``width + 1`` float32 sub-step sigmas of a segment: its start, the recorded sigmas
        inside it, its end, then the end repeated (zero-length padding)."""
        inner = self._sigmas[cut.start + 1: cut.stop]
        window = np.concatenate([[cut.sigma_start], inner, np.full(width + 1 - len(inner) - 1, cut.sigma_end)])
        return window.astype(np.float32)

    # -- resume ---------------------------------------------------------------------------------
    def mark_consumed(self, batch_or_sample) -> None:
        """Record that the training loop consumed this (collated) batch or sample (needed with
        DataLoader workers; harmless without)."""
        pos = batch_or_sample["stream_pos"] if isinstance(batch_or_sample, dict) else batch_or_sample
        pos = torch.as_tensor(pos).reshape(-1, 4).tolist()
        if pos:
            self._offset = (pos[-1][0] + 1) % pos[-1][1]  # a batch comes from one worker
        for wid, nw, epoch, p in pos:
            if self._num_workers is not None and self._num_workers != nw and self._consumed:
                raise ArcflowError(f"batch comes from a DataLoader with {nw} workers, the stream had {self._num_workers}")
            self._num_workers = nw
            nxt = _next_pos(epoch, p + 1)
            if nxt > self._consumed.get(wid, (-1, -1)):
                self._consumed[wid] = nxt

    def state_dict(self) -> dict:
        """Small, JSON-able position of this rank's stream (store it in the training checkpoint)."""
        positions = dict(self._start)
        for w, p in self._consumed.items():
            if p > positions.get(w, (-1, -1)):
                positions[w] = p
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shuffle_buffer": self.shuffle_buffer,
            "rank": self.rank,
            "world_size": self.world_size,
            "shards": list(self.shards),
            "num_workers": self._num_workers,
            "next_worker": self._offset,
            "positions": {str(w): [int(e), int(p)] for w, (e, p) in sorted(positions.items())},
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (from ``state_dict()`` of a stream over the same data and settings)."""
        if state.get("version") != STATE_VERSION:
            raise ArcflowError(f"unknown stream state version {state.get('version')!r}")
        for key in ("seed", "shuffle", "shuffle_buffer", "rank", "world_size"):
            if state[key] != getattr(self, key):
                raise ArcflowError(f"stream state has {key}={state[key]!r} but this stream has {getattr(self, key)!r}")
        if list(state["shards"]) != list(self.shards):
            raise ArcflowError(
                f"stream state covers {len(state['shards'])} shards but the stream has {len(self.shards)} "
                "(the dataset changed; pass shards=state['shards'] to resume over the same data)"
            )
        self._num_workers = state["num_workers"]
        self._start = {int(w): (int(e), int(p)) for w, (e, p) in state["positions"].items()}
        self._consumed = dict(self._start)
        self._offset = int(state.get("next_worker", 0))

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_reader"] = None  # each worker opens its own (zarr stores are not shared across processes)
        return d


@dataclass(frozen=True)
class _Cut:
    """One segment on the recorded schedule: velocities of steps ``start..stop-1``; the segment
    starts ``lead`` sigma after step ``start`` begins (0 on a recorded step) and runs from
    ``sigma_start`` to ``sigma_end`` (float32, as the sampler's own sigmas)."""

    start: int
    stop: int
    lead: np.float32
    sigma_start: np.float32
    sigma_end: np.float32


def _segment_cuts(recorded: np.ndarray, segment_bounds, segment_sigmas) -> list[_Cut]:
    """The segments of a stream, from step indices or from sigmas (see :class:`TrajectoryStream`)."""
    steps = len(recorded) - 1
    if segment_bounds is not None and segment_sigmas is not None:
        raise ArcflowError("give segment_bounds or segment_sigmas, not both")
    if segment_sigmas is None:
        bounds = [0, steps] if segment_bounds is None else [int(b) for b in segment_bounds]
        if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != steps or any(b >= c for b, c in zip(bounds, bounds[1:])):
            raise ArcflowError(f"segment bounds must increase from 0 to the dataset's {steps} steps, got {bounds}")
        segment_sigmas = [recorded[b] for b in bounds]
    cuts = [float(s) for s in segment_sigmas]
    if (len(cuts) < 2 or cuts[0] != recorded[0] or cuts[-1] != recorded[-1]
            or any(not a > b for a, b in zip(cuts, cuts[1:]))):
        raise ArcflowError(
            f"segment sigmas must decrease from the dataset's first sigma {recorded[0]} to its last {recorded[-1]}, "
            f"got {cuts[:8]}"
        )
    # step j spans sigmas (recorded[j+1], recorded[j]]: find the step each boundary falls in
    ascending = recorded[::-1]
    out = []
    for a, b in zip(cuts, cuts[1:]):
        start = steps - int(np.searchsorted(ascending, a, side="left"))  # recorded[start] >= a > recorded[start+1]
        stop = steps - int(np.searchsorted(ascending, b, side="right")) + 1  # the last step the segment touches, + 1
        lead = np.float32(recorded[start]) - np.float32(a)
        out.append(_Cut(start, stop, lead, np.float32(a), np.float32(b)))
    return out


def _next_pos(epoch: int, pos: int) -> tuple[int, int]:
    return (int(epoch), int(pos))


def _torch_dtype(dt: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.zeros(1, dt)).dtype
