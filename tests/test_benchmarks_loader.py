"""benchmarks/loader.py: the FLUX-shaped shard builder (trajectories cycled under new ids), used bytes,
page-cache eviction and one streamed epoch through the reading-process measurements, on tiny data."""

import numpy as np
import pytest
from storage_bytes import encode

import loader
from arcflow.storage import DatasetSpec, create_or_open_dataset, open_dataset

STEPS, LAT = 50, (4, 2)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """3 float32 trajectories (Euler-consistent) in 2 shards, 2 prompts."""
    url = tmp_path_factory.mktemp("src") / "ds"
    sig = np.linspace(1.0, 0.0, STEPS + 1)
    spec = DatasetSpec(teacher_id="t", teacher_revision="r", latent_shape=LAT, sigmas=sig, shift=1.0, guidance=2.0,
                       num_samples=3, shard_size=2, seed=0, storage_dtype="float32",
                       cond_spec={"emb": ((3,), "float32")})
    w = create_or_open_dataset(str(url), spec)
    rng = np.random.default_rng(0)
    u = rng.standard_normal((3, STEPS, *LAT)).astype(np.float32)
    x = np.empty((3, STEPS + 1, *LAT), np.float32)
    x[:, 0] = rng.standard_normal((3, *LAT))
    sig32 = sig.astype(np.float32)
    steps = sig32[:-1] - sig32[1:]  # the float32 step sizes readers rebuild states with
    for j in range(STEPS):
        x[:, j + 1] = x[:, j] - steps[j] * u[:, j]
    emb = np.array([[1, 2, 3], [1, 2, 3], [4, 5, 6]], np.float32)
    prompts = ["a", "a", "b"]
    for s, rows in ((0, [0, 1]), (1, [2])):
        w.write_shard(s, x[rows], u[rows], sig, {"emb": emb[rows]}, rows, rows, [prompts[i] for i in rows], 2.0)
    return url, x, u, emb, prompts


def test_replicated_source_cycles_the_trajectories_under_new_ids(source):
    url, x, u, emb, prompts = source
    src = loader.replicated_source(str(url), shard_samples=4, shards=2)
    assert src.shard_sizes == [4, 4] and src.prompts_per_shard == [2, 2]
    shards = list(src.shards())
    assert [sh["shard_id"] for sh in shards] == [0, 1]
    ids = np.concatenate([sh["sample_ids"] for sh in shards])
    assert ids.tolist() == list(range(8))
    rows = ids % 3
    np.testing.assert_array_equal(np.concatenate([sh["x"] for sh in shards]), x[rows])
    np.testing.assert_array_equal(np.concatenate([sh["u"] for sh in shards]), u[rows])
    np.testing.assert_array_equal(np.concatenate([sh["cond"]["emb"] for sh in shards]), emb[rows])
    assert sum((sh["prompts"] for sh in shards), []) == [prompts[i] for i in rows]


@pytest.mark.parametrize("fmt", ["v1", "v2"])
def test_one_measured_epoch_reads_every_item(source, tmp_path, fmt):
    url, *_ = source
    out = tmp_path / fmt
    encode(loader.replicated_source(str(url), 4, 2), fmt, "float16", "blosc-zstd", out)
    assert open_dataset(str(out)).spec.format_version == int(fmt[1])
    assert loader.evict_page_cache(out) > 0
    r = loader.stream_epoch(str(out), workers=0, batch=2, shuffle_buffer=4, evict=True)
    assert r["examples"] == 8 * 2 and r["examples_per_s"] > 0 and r["worker_peak_rss_mb"] == []
    (reader,) = r["readers"]
    assert reader["items"] == 16 and reader["rchar"] > 0 and reader["peak_rss_mb"] >= reader["rss_start_mb"] > 0


def test_used_bytes_is_one_state_and_half_the_velocities():
    from arcflow.storage.format import CondField

    cond = {"emb": CondField((3,), "float32"), "cls": CondField((), "int64")}
    assert loader.used_bytes((4096, 64), 50, "float16", cond) == {"xu": 26 * 4096 * 64 * 2, "cond": 6 + 8,
                                                                   "segment_width": 25}
    f8 = loader.used_bytes((4096, 64), 50, "float8_e4m3", {})
    assert f8["xu"] == 4096 * 64 * 2 + 25 * 4096 * 64 + 25 * 4
    assert loader.parse_config("v2:float8_e4m3") == ("v2", "float8_e4m3")
    with pytest.raises(SystemExit):
        loader.parse_config("v1:float8_e4m3")
