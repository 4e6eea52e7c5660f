"""Streaming the committed shards of a trajectory dataset into torch: ``TrajectoryStream``.

Splitting. The stream of one process (``rank`` of ``world_size``, e.g. Ray Train / DDP ranks) is
split further across its DataLoader workers: the dataset's shards are the units, and in epoch ``e``
the shard list (shuffled with ``(seed, e)``) is dealt round-robin to the ``world_size * W``
consumers (``W`` = DataLoader workers, 1 without workers). So in every epoch each committed sample is
seen exactly once across all ranks and workers. Ranks can get different sample counts (shards differ
in size, and the counts need not divide): with DDP prefer an infinite stream (``epochs=None``) and a
fixed number of optimizer steps.

Shuffling (``shuffle=True``). Per epoch: shard order as above; each shard's rows in a random
permutation; then a bounded shuffle buffer of ``shuffle_buffer`` samples mixes consecutive shards of
a consumer. Everything is a pure function of ``(seed, epoch, consumer)``: deterministic per seed,
different between epochs.

Memory. A worker holds one shard (as stored: float16/bfloat16 halves it) plus at most
``shuffle_buffer`` samples; never the dataset. One sample of FLUX.1-dev at 1024px (4096 tokens x 64,
51 states + 50 velocities) is ~53 MB in float16, so size ``shard_size`` and ``shuffle_buffer`` with
that in mind.

Yielded samples: dicts of CPU tensors, ``x`` [S+1, *latent] float32, ``u`` [S, *latent] float32,
``sigmas`` [S+1] float32, each conditioning field (floating ones as float32), ``sample_id``,
``seed`` (int64 scalars), ``guidance`` (float32 scalar) and ``stream_pos`` (int64 [4]: worker id,
worker count, epoch, position in the epoch: bookkeeping for resuming).

Resuming. ``state_dict()`` is small (epoch and position per worker) and goes into checkpoints;
``load_state_dict()`` before iterating makes the stream continue exactly where the consumed samples
stopped, i.e. a resumed run sees the same sequence as an uninterrupted one, at SAMPLE granularity:

- ``num_workers=0``: the stream tracks what it yielded by itself; nothing else to do.
- ``num_workers>0``: the worker copies cannot report back, so call ``stream.mark_consumed(batch)``
  for each batch the training loop has taken (it reads ``batch["stream_pos"]``). Samples prefetched
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
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from arcflow.storage import _io
from arcflow.storage.errors import ArcflowError
from arcflow.storage.reader import TrajectoryReader, open_dataset

STATE_VERSION = 1


class TrajectoryStream(IterableDataset):
    """An ``IterableDataset`` of per-sample trajectory dicts over a dataset's COMMITTED shards.

    ``rank``/``world_size`` default to ``torch.distributed``'s when it is initialized, else 0/1.
    ``epochs=None`` iterates forever; an int stops after that many epochs (per consumer).
    ``shards`` restricts the stream to some committed shards (default: all committed at construction;
    shards committed later are not picked up by this object). ``cond`` selects the conditioning
    fields to yield (default: all of the dataset's).
    """

    def __init__(
        self,
        url: str,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 64,
        epochs: int | None = None,
        shards: Sequence[int] | None = None,
        cond: Sequence[str] | None = None,
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
        committed = reader.require_committed_shards()
        if shards is None:
            self.shards = committed
        else:
            self.shards = sorted({int(s) for s in shards})
            missing = sorted(set(self.shards) - set(committed))
            if missing:
                raise ArcflowError(f"dataset {self.url}: shards {missing[:5]} are not committed")
            if not self.shards:
                raise ArcflowError("TrajectoryStream needs at least one shard")
        self.sizes = reader.shard_sizes(self.shards)
        names = list(self.spec.cond_spec) if cond is None else list(cond)
        unknown = sorted(set(names) - set(self.spec.cond_spec))
        if unknown:
            raise ArcflowError(f"dataset {self.url} has no conditioning field(s) {unknown}")
        self.cond_names = names
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
    def samples_per_epoch(self) -> int:
        """Samples in one epoch over ALL ranks and workers (this stream's shards)."""
        return sum(self.sizes.values())

    # -- planning (pure functions of seed, epoch, consumer; no I/O) -------------------------------
    def _consumer_shards(self, epoch: int, consumer: int, consumers: int) -> list[int]:
        order = list(self.shards)
        if self.shuffle:
            order = [order[i] for i in np.random.default_rng([self.seed, epoch]).permutation(len(order))]
        return order[consumer::consumers]

    def _events(self, epoch: int, consumer: int, consumers: int) -> Iterator[tuple]:
        """("load", s) | ("emit", s, row) | ("retain", s, rows still buffered when leaving shard s)."""
        rng = np.random.default_rng([self.seed, epoch, consumers, consumer, 1])
        cap = self.shuffle_buffer if self.shuffle else 0
        buf: list[tuple[int, int]] = []
        for s in self._consumer_shards(epoch, consumer, consumers):
            n = self.sizes[s]
            rows = rng.permutation(n) if self.shuffle else np.arange(n)
            yield ("load", s)
            for r in rows.tolist():
                if cap == 0:
                    yield ("emit", s, r)
                elif len(buf) < cap:
                    buf.append((s, r))
                else:
                    j = int(rng.integers(cap))
                    out, buf[j] = buf[j], (s, r)
                    yield ("emit", *out)
            yield ("retain", s, [r for (t, r) in buf if t == s])
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
        sigmas = torch.tensor(self.spec.sigmas, dtype=torch.float32)
        in_worker = get_worker_info() is not None
        for epoch in epochs:
            events = self._events(epoch, consumer, consumers)
            current: tuple[int, dict, dict] | None = None  # (shard, raw arrays, dtype kinds)
            cache: dict[tuple[int, int], tuple[dict, dict]] = {}
            pos = 0
            if epoch == epoch0 and pos0 > 0:
                current, cache, pos = self._fast_forward(events, pos0)
            for ev in events:
                if ev[0] == "load":
                    arrays, kinds = self._reader.read_shard_raw(ev[1], names=self._array_names())
                    current = (ev[1], arrays, kinds)
                elif ev[0] == "retain":
                    s, rows = ev[1], ev[2]
                    for r in rows:
                        cache[(s, r)] = ({k: np.array(v[r]) for k, v in current[1].items() if k != "sigmas"}, current[2])
                    current = None
                else:
                    s, r = ev[1], ev[2]
                    if (s, r) in cache:
                        row, kinds = cache.pop((s, r))
                    else:
                        row, kinds = {k: v[r] for k, v in current[1].items() if k != "sigmas"}, current[2]
                    sample = self._to_torch(row, kinds, sigmas)
                    sample["stream_pos"] = torch.tensor([wid, nw, epoch, pos], dtype=torch.int64)
                    pos += 1
                    if not in_worker:
                        self._consumed[wid] = _next_pos(epoch, pos)
                    yield sample

    def _fast_forward(self, events: Iterator[tuple], target: int):
        """Advance ``events`` past ``target`` emissions without data, then load what is buffered."""
        pos, current, kept = 0, None, set()
        while pos < target:
            ev = next(events, None)
            if ev is None:
                break
            if ev[0] == "load":
                current = ev[1]
            elif ev[0] == "retain":
                kept.update((ev[1], r) for r in ev[2])
                current = None
            else:
                kept.discard((ev[1], ev[2]))
                pos += 1
        cache: dict[tuple[int, int], tuple[dict, dict]] = {}
        by_shard: dict[int, list[int]] = {}
        for s, r in kept:
            by_shard.setdefault(s, []).append(r)
        names = self._array_names()
        for s, rows in by_shard.items():
            rows = sorted(rows)
            arrays, kinds = self._reader.read_shard_raw(s, rows=rows, names=names)
            for k, r in enumerate(rows):
                cache[(s, r)] = ({n: a[k] for n, a in arrays.items() if n != "sigmas"}, kinds)
        cur = None
        if current is not None:
            arrays, kinds = self._reader.read_shard_raw(current, names=names)
            cur = (current, arrays, kinds)
        return cur, cache, pos

    def _array_names(self) -> list[str]:
        return ["x", "u", *self.cond_names, "sample_id", "seed", "guidance"]

    def _to_torch(self, row: dict, kinds: dict, sigmas: torch.Tensor) -> dict:
        out = {}
        for name, a in row.items():
            if kinds.get(name) is not None or a.dtype.kind == "f":
                a = _io.decode_float(a, kinds.get(name), None).astype(np.float32, copy=True)
            else:
                a = np.array(a)
            out[name] = torch.from_numpy(a) if a.ndim else torch.tensor(a.item(), dtype=_torch_dtype(a.dtype))
        out["sigmas"] = sigmas
        return out

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


def _next_pos(epoch: int, pos: int) -> tuple[int, int]:
    return (int(epoch), int(pos))


def _torch_dtype(dt: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.zeros(1, dt)).dtype
