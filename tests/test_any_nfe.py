"""Any NFE from a recorded dataset: segment boundaries between recorded steps (docs/architecture.md,
Offline distillation). The references here are computed independently from the whole recorded
trajectories (the sampler's Euler path), not through the stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from arcflow.distill.runs import load_run
from arcflow.distill.segments import segment_sigmas
from arcflow.pipeline.sigmas import shifted_schedule
from arcflow.storage.reader import open_dataset
from arcflow.storage.streaming import TrajectoryStream
from dataset_factory import make_dataset, train_tiny_run

STEPS = 10  # keyframes every 5 steps: states inside a block are rebuilt by the reader


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("anynfe") / "ds", num_samples=16, steps=STEPS, shard_size=16)


def _recorded(dataset):
    reader = open_dataset(str(dataset))
    x, u = reader.shard(0).trajectories(np.arange(16))
    return reader.spec, x.astype(np.float64), u.astype(np.float64)


def _euler_state(x, u, sigmas, row, s):
    """The recorded Euler path of sample ``row`` at sigma ``s`` (linear within the step holding s)."""
    j = max(i for i in range(len(sigmas) - 1) if sigmas[i] >= s) if s > sigmas[-1] else len(sigmas) - 1
    return x[row, j] if j == len(sigmas) - 1 else x[row, j] - (sigmas[j] - s) * u[row, j]


def test_segment_sigmas_are_the_recorded_ones_on_steps_and_the_teachers_schedule_between():
    recorded = shifted_schedule(STEPS, 3.0).tolist()
    assert segment_sigmas(recorded, 3.0, 2) == [recorded[0], recorded[5], recorded[10]]
    for nfe in (3, 4, 7):
        got = segment_sigmas(recorded, 3.0, nfe)
        assert np.allclose(got, shifted_schedule(nfe, 3.0).numpy(), atol=1e-12, rtol=0)
        assert all(a > b for a, b in zip(got, got[1:]))
    assert segment_sigmas(recorded, float("nan"), 5) == recorded[::2]  # on recorded steps: no shift needed
    with pytest.raises(ValueError, match="choose an NFE that divides 10"):
        segment_sigmas(recorded, float("nan"), 3)


@pytest.mark.parametrize("nfe", [3, 4])
def test_items_between_steps_lie_on_the_recorded_euler_path(dataset, nfe):
    spec, x, u = _recorded(dataset)
    sig = np.asarray(spec.sigmas, dtype=np.float64)
    cuts = segment_sigmas(spec.sigmas, spec.shift, nfe)
    assert any(c not in set(spec.sigmas) for c in cuts), "the test needs boundaries between recorded steps"
    stream = TrajectoryStream(str(dataset), segment_sigmas=cuts, epochs=1, shuffle=False, cache_bytes=0)
    items = list(stream)
    assert len(items) == 16 * nfe
    for item in items:
        row, seg = int(item["sample_id"]) % 16, int(item["segment"])
        assert row == int(item["sample_id"])
        s_a, s_b = cuts[seg], cuts[seg + 1]
        np.testing.assert_allclose(item["x"].numpy(), _euler_state(x, u, sig, row, s_a), atol=2e-6, rtol=0)
        window, weights = item["sigmas"].numpy().astype(np.float64), item["weights"].numpy()
        inside = [s for s in sig if s_b < s < s_a]
        used = len(inside) + 1
        np.testing.assert_allclose(window[: used + 1], [s_a, *inside, s_b], atol=1e-7, rtol=0)
        assert np.all(window[used:] == window[used]) and np.all(weights[used:] == 0)
        assert abs(weights.sum() - 1) < 1e-5
        # each sub-step's velocity is the recorded one of the step holding it ...
        for i in range(used):
            mid = (window[i] + window[i + 1]) / 2
            j = max(k for k in range(STEPS) if sig[k] >= mid)
            np.testing.assert_allclose(item["u"][i].numpy(), u[row, j], atol=1e-6, rtol=0)
        # ... so integrating the item from its state reaches the path's state at the segment end
        end = item["x"].numpy() - np.tensordot(window[:-1] - window[1:], item["u"].numpy(), axes=1)
        np.testing.assert_allclose(end, _euler_state(x, u, sig, row, s_b), atol=1e-5, rtol=0)


def test_boundaries_on_recorded_steps_give_the_same_items_as_step_indices(dataset):
    spec = open_dataset(str(dataset)).spec
    by_steps = TrajectoryStream(str(dataset), segment_bounds=[0, 5, 10], epochs=1, shuffle=False, cache_bytes=0)
    by_sigmas = TrajectoryStream(str(dataset), segment_sigmas=segment_sigmas(spec.sigmas, spec.shift, 2), epochs=1,
                                 shuffle=False, cache_bytes=0)
    for a, b in zip(by_steps, by_sigmas, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_nfe_3_trains_on_a_10_step_dataset_and_samples_in_3_calls(dataset, tmp_path):
    train_tiny_run(dataset, tmp_path / "run", nfe=3)
    loaded = load_run(tmp_path / "run", merge_lora=False)
    spec = open_dataset(str(dataset)).spec
    assert loaded.nfe == 3
    assert loaded.scheduler.config.segment_sigmas == pytest.approx(segment_sigmas(spec.sigmas, spec.shift, 3), abs=1e-7)
    calls = []
    hook = loaded.student.transformer.register_forward_hook(lambda *_: calls.append(1))
    try:
        latents = loaded.sample_latents(["a handwritten digit 3", "a handwritten digit 7"], [0, 1])
    finally:
        hook.remove()
    assert len(calls) == 3 and torch.isfinite(latents).all()


def test_an_nfe_between_steps_of_a_schedule_without_a_static_shift_is_one_line(dataset, tmp_path):
    import json
    import shutil

    from arcflow.core.errors import ArcflowError
    from arcflow.distill.config import DistillConfig
    from arcflow.distill.run_plan import plan_run

    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    header = json.loads((copy / "dataset.json").read_text())
    header["shift"] = float("nan")
    (copy / "dataset.json").write_text(json.dumps(header))
    config = DistillConfig.from_dict(dict(dataset=str(copy), out=str(tmp_path / "run"), nfe=3, batch_size=8))
    with pytest.raises(ArcflowError, match="--nfe 3 is not representable on this dataset: .*divides 10"):
        plan_run(config)
    assert plan_run(DistillConfig.from_dict(dict(dataset=str(copy), out=str(tmp_path / "run"), nfe=5, batch_size=8))).segment_sigmas
