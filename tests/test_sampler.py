import numpy as np
import pytest
import torch
from arcflow.distill.momentum import MomentumParams
from reference_sampling import sample_few_step
from arcflow.distill.segments import segment_step_indices
from arcflow.pipeline.sigmas import shifted_schedule
from momentum_reference import reference_velocity

K, C, N, G = 4, 4, 3, 2


def segment_law(x, sigma_start):
    """A synthetic curved flow: at each segment start, momentum parameters that depend on (x, sigma)."""
    gen = torch.Generator().manual_seed(int(round(float(sigma_start) * 1e6)))
    mix = torch.randn(K, C, C, generator=gen, dtype=torch.float64) * 0.5
    v = torch.einsum("kcd,bdn->bkcn", mix, x) + 0.3
    logits = torch.randn(1, K, G, N, generator=gen, dtype=torch.float64).expand(x.shape[0], -1, -1, -1)
    gammas = 2 * torch.randn(1, K - 1, G, N, generator=gen, dtype=torch.float64).expand(x.shape[0], -1, -1, -1)
    return v, logits, gammas


def rk4_reference(x0, boundaries, substeps=400):
    """Fine RK4 integration of dx/ds = v(s) with v from the momentum law frozen at each segment start."""
    x = x0.numpy().copy()
    for s0, s1 in zip(boundaries[:-1], boundaries[1:]):
        v, logits, gammas = (t.numpy() for t in segment_law(torch.from_numpy(x), s0))
        vel = lambda s: reference_velocity(v, logits, gammas, s0, s)
        h = (s1 - s0) / substeps
        s = s0
        for _ in range(substeps):
            k1 = vel(s)
            k2 = vel(s + h / 2)
            k4 = vel(s + h)
            x = x + h / 6 * (k1 + 4 * k2 + k4)  # dx/ds = v(s): RK4 reduces to Simpson here
            s += h
    return x


@pytest.mark.parametrize("nfe,shift", [(1, 1.0), (2, 1.0), (2, 3.0), (4, 2.0)])
def test_sampler_reproduces_exact_endpoint_of_a_momentum_flow(nfe, shift):
    calls = []

    def predict(x, sigma, cond):
        calls.append(sigma.clone())
        assert cond == "cond"
        return MomentumParams(*segment_law(x, sigma[0].item()))

    x0 = torch.randn(2, C, N, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    boundaries = shifted_schedule(nfe, shift).tolist()
    out = sample_few_step(predict, x0, "cond", sigmas=shifted_schedule(nfe, shift))
    assert len(calls) == nfe
    assert [c[0].item() for c in calls] == pytest.approx(boundaries[:-1], abs=1e-7)
    reference = rk4_reference(x0, boundaries)
    np.testing.assert_allclose(out.numpy(), reference, rtol=1e-5, atol=1e-5)


def test_shifted_schedule_and_segments():
    s = shifted_schedule(4, 3.0)
    assert s[0] == 1.0 and s[-1] == 0.0 and bool((s[:-1] > s[1:]).all())
    assert s[2].item() == pytest.approx(3 * 0.5 / (1 + 2 * 0.5))
    assert segment_step_indices(50, 2) == [0, 25, 50]
    assert segment_step_indices(48, 4) == [0, 12, 24, 36, 48]
    with pytest.raises(ValueError, match="does not divide"):
        segment_step_indices(50, 3)
    with pytest.raises(ValueError, match=">= 1"):
        segment_step_indices(50, 0)


def test_sampler_rejects_bad_boundaries():
    predict = lambda x, s, c: None
    with pytest.raises(ValueError, match="decreasing"):
        sample_few_step(predict, torch.zeros(1, C, N), sigmas=torch.tensor([0.5, 0.7]))
