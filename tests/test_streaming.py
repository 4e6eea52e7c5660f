"""TrajectoryStream: (sample, segment) items, splitting across ranks x workers, per-epoch shuffle,
exact resume, whole-shard and windowed reads."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import torch
from arcflow.distill.loss import segment_batch
from arcflow.storage import DatasetSpec, TrajectoryStream, create_or_open_dataset, open_dataset
from arcflow.core.errors import ArcflowError
from torch.utils.data import DataLoader

from test_storage import euler_states

S = 4
LAT = (4, 2)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream") / "ds"
    spec = DatasetSpec(
        teacher_id="t", teacher_revision="r", latent_shape=LAT, sigmas=np.linspace(1, 0, S + 1), shift=1.0,
        guidance=2.0, num_samples=47, shard_size=5, seed=0, cond_spec={"emb": ((3,), "float32")},
        storage_dtype="bfloat16",
    )
    w = create_or_open_dataset(str(root), spec)
    rng = np.random.default_rng(0)
    for s in range(spec.num_shards):
        ids = np.array(list(spec.shard_samples(s)))
        n = len(ids)
        u = rng.standard_normal((n, S, *LAT)).astype(np.float32)
        noise = np.broadcast_to(ids[:, None, None].astype(np.float32), (n, *LAT))  # x_0 encodes the sample id
        w.write_shard(s, euler_states(noise, u, spec.sigmas), u, spec.sigmas, {"emb": rng.standard_normal((n, 3))},
                      ids, ids + 100, [f"p{i}" for i in ids], 2.0)
    # an uncommitted shard group (shard 9 of 10 written, its parquet part removed) must never be streamed
    (root / "index" / "shard-000009.parquet").unlink()
    return str(root)


def ids_of(samples) -> list[int]:
    return [int(s["sample_id"]) for s in samples]


COMMITTED = set(range(45))  # shards 0..8 of 5 samples; shard 9 (45, 46) is uncommitted


def test_sample_contents(dataset):
    s = next(iter(TrajectoryStream(dataset, seed=1)))  # default: one segment, the whole trajectory
    assert s["x"].shape == LAT and s["x"].dtype == torch.float32
    assert s["u"].shape == (S, *LAT) and s["u"].dtype == torch.float32
    assert s["sigmas"].shape == (S + 1,) and s["emb"].shape == (3,) and s["emb"].dtype == torch.float32
    assert float(s["sigma"]) == 1.0 and int(s["segment"]) == 0
    torch.testing.assert_close(s["weights"].sum(), torch.tensor(1.0))
    assert s["sample_id"].dtype == torch.int64 and s["seed"] == s["sample_id"] + 100
    assert float(s["guidance"]) == 2.0
    assert torch.all(s["x"] == s["sample_id"].float())  # x_0 encodes its sample id: data matches the id


BOUNDS = [0, 1, 4]  # unequal segments: the first is padded to 3 sub-steps


@pytest.mark.parametrize("cache_bytes", [64 << 20, 0])  # whole-shard reads, and item-by-item windowed reads
def test_segment_items_match_the_trajectories_they_come_from(dataset, cache_bytes):
    reader = open_dataset(dataset)
    by_id = {}
    for shard in reader.committed_shards():
        d = reader.read_shard(shard)
        for row, sid in enumerate(d["sample_id"].tolist()):
            by_id[sid] = (torch.from_numpy(d["x"][row]), torch.from_numpy(d["u"][row]), d["emb"][row])
    sigmas = torch.tensor(reader.spec.sigmas, dtype=torch.float32)
    stream = TrajectoryStream(dataset, segment_bounds=BOUNDS, seed=4, epochs=1, shuffle_buffer=7, cache_bytes=cache_bytes,
                              endpoints=True)
    seen = Counter()
    for item in stream:
        sid, seg = int(item["sample_id"]), int(item["segment"])
        seen[(sid, seg)] += 1
        x, u, emb = by_id[sid]
        ref = segment_batch(x[None], u[None], sigmas, BOUNDS, torch.tensor([seg]), {})
        for key in ("x", "sigma", "sigmas", "u", "weights"):
            torch.testing.assert_close(item[key], ref[key][0], rtol=0, atol=2e-6, msg=key)
        np.testing.assert_array_equal(item["emb"].numpy(), emb)
        torch.testing.assert_close(item["noise"], x[0])
        torch.testing.assert_close(item["final"], x[-1])
    assert set(seen) == {(i, g) for i in COMMITTED for g in range(2)} and set(seen.values()) == {1}


@pytest.mark.parametrize("cache_bytes", [64 << 20, 0])
def test_segment_stream_resumes_exactly(dataset, cache_bytes):
    kw = dict(segment_bounds=BOUNDS, seed=9, epochs=2, shuffle_buffer=5, cache_bytes=cache_bytes)

    def keys(items):
        return [(int(i["sample_id"]), int(i["segment"])) for i in items]

    full = keys(TrajectoryStream(dataset, **kw))
    first = TrajectoryStream(dataset, **kw)
    head = keys(itertools.islice(iter(first), 33))
    resumed = TrajectoryStream(dataset, **kw)
    resumed.load_state_dict(first.state_dict())
    assert head + keys(resumed) == full and len(full) == 2 * 2 * 45


def test_every_sample_once_per_epoch_across_ranks_and_workers(dataset):
    per_epoch = [Counter() for _ in range(2)]
    for rank in range(2):
        stream = TrajectoryStream(dataset, rank=rank, world_size=2, seed=3, epochs=2, shuffle_buffer=4)
        loader = DataLoader(stream, batch_size=3, num_workers=2)
        for batch in loader:
            for sid, epoch in zip(batch["sample_id"].tolist(), batch["stream_pos"][:, 2].tolist()):
                per_epoch[epoch][sid] += 1
            assert torch.all(batch["x"][:, 0, 0] == batch["sample_id"].float())
    for c in per_epoch:
        assert set(c) == COMMITTED and set(c.values()) == {1}


def test_shuffle_deterministic_per_seed_and_differs_between_epochs(dataset):
    def run(seed):
        return ids_of(TrajectoryStream(dataset, seed=seed, epochs=2, shuffle_buffer=8))

    a, b, c = run(5), run(5), run(6)
    assert a == b and a != c
    e0, e1 = a[:45], a[45:]
    assert sorted(e0) == sorted(e1) == sorted(COMMITTED) and e0 != e1
    plain = ids_of(TrajectoryStream(dataset, shuffle=False, epochs=1))
    assert plain == sorted(COMMITTED)


def test_infinite_stream_keeps_going(dataset):
    got = ids_of(itertools.islice(iter(TrajectoryStream(dataset, seed=0)), 45 * 3 + 7))
    assert Counter(got[:90]) == Counter({i: 2 for i in COMMITTED})


@pytest.mark.parametrize("stop", [0, 1, 7, 44, 45, 46, 80])
def test_resume_single_process_exact(dataset, stop):
    kw = dict(seed=11, epochs=2, shuffle_buffer=6)
    full = ids_of(TrajectoryStream(dataset, **kw))
    first = TrajectoryStream(dataset, **kw)
    head = ids_of(itertools.islice(iter(first), stop))
    state = first.state_dict()
    resumed = TrajectoryStream(dataset, **kw)
    resumed.load_state_dict(state)
    assert head + ids_of(resumed) == full


def test_resume_with_workers_via_mark_consumed(dataset):
    kw = dict(rank=1, world_size=2, seed=2, epochs=3, shuffle_buffer=3)

    def loader(stream):
        return DataLoader(stream, batch_size=2, num_workers=2)

    full = [b["sample_id"].tolist() for b in loader(TrajectoryStream(dataset, **kw))]
    stream = TrajectoryStream(dataset, **kw)
    head = []
    for batch in loader(stream):  # workers prefetch ahead; only consumed batches count
        head.append(batch["sample_id"].tolist())
        stream.mark_consumed(batch)
        if len(head) == 7:
            break
    state = stream.state_dict()
    resumed = TrajectoryStream(dataset, **kw)
    resumed.load_state_dict(state)
    rest = [b["sample_id"].tolist() for b in loader(resumed)]
    assert head + rest == full
    # a different worker count cannot continue this state
    bad = TrajectoryStream(dataset, **kw)
    bad.load_state_dict(state)
    with pytest.raises(ArcflowError, match="num_workers"):
        next(iter(bad))


def test_state_mismatch_and_no_committed_shards(dataset, tmp_path):
    st = TrajectoryStream(dataset, seed=1).state_dict()
    with pytest.raises(ArcflowError, match="seed"):
        TrajectoryStream(dataset, seed=2).load_state_dict(st)
    spec = DatasetSpec(teacher_id="t", teacher_revision="r", latent_shape=LAT, sigmas=[1.0, 0.0], shift=1.0,
                       guidance=1.0, num_samples=4, shard_size=2, seed=0)
    create_or_open_dataset(str(tmp_path / "empty"), spec)
    with pytest.raises(ArcflowError, match="no committed shards"):
        TrajectoryStream(str(tmp_path / "empty"))


def test_more_consumers_than_shards(dataset):
    seen = Counter()
    for rank in range(12):  # 12 ranks, 9 shards: some ranks get nothing and stop instead of spinning
        seen.update(ids_of(TrajectoryStream(dataset, rank=rank, world_size=12, epochs=1)))
    assert set(seen) == COMMITTED and set(seen.values()) == {1}
