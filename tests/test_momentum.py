import mpmath
import numpy as np
import pytest
import torch
from arcflow.distill.momentum import (
    MomentumParams,
    average_velocities,
    displacement,
    integrate,
    phi,
    velocity_at,
)
from momentum_reference import quadrature_displacement, reference_velocity

SPECIAL_GAMMAS = [0.0, 1e-12, -3e-9, 1e-6, -9.99e-4, 1.001e-3, 0.5, -2.0, 12.0, -25.0, 30.0]


def random_params(k, channels, groups, n=3, batch=2, seed=0, dtype=torch.float64, special=True):
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(batch, k, channels, n, generator=gen, dtype=dtype)
    logits = 2 * torch.randn(batch, k, groups, n, generator=gen, dtype=dtype)
    g = 3 * torch.randn(batch, k - 1, groups, n, generator=gen, dtype=dtype)
    if special and k > 1:
        flat = g.view(-1)
        picks = torch.tensor(SPECIAL_GAMMAS, dtype=dtype)
        flat[: min(len(picks), flat.numel())] = picks[: flat.numel()]
    return MomentumParams(v, logits, g)


def as_np(p):
    return p.velocities.numpy(), p.logits.numpy(), p.log_gammas.numpy()


@pytest.mark.parametrize("k,channels,groups", [(1, 4, 1), (2, 4, 2), (5, 6, 3), (8, 4, 4), (16, 2, 1)])
@pytest.mark.parametrize("s_src,s_a,s_b", [(1.0, 1.0, 0.5), (0.5, 0.4, 0.0), (0.9, 0.9, 0.899), (1.0, 0.7, 0.2)])
def test_displacement_matches_fine_quadrature(k, channels, groups, s_src, s_a, s_b):
    params = random_params(k, channels, groups, seed=k * 31 + channels)
    exact = displacement(params, s_src, s_a, s_b).numpy()
    reference = quadrature_displacement(*as_np(params), s_src, s_a, s_b)
    rel = np.abs(exact - reference) / np.maximum(np.abs(reference), 1e-3 * np.abs(reference).max())
    assert rel.max() < 1e-6, rel.max()


def test_velocity_matches_reference():
    params = random_params(6, 4, 2, seed=3)
    for s in (0.9, 0.5, 0.1):
        ours = velocity_at(params, 0.9, s).numpy()
        ref = reference_velocity(*as_np(params), 0.9, s)
        np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-12)


def test_per_sample_sigmas_match_scalar_calls():
    params = random_params(4, 4, 2, batch=3, seed=5)
    s_src = torch.tensor([1.0, 0.6, 0.3], dtype=torch.float64)
    s_b = torch.tensor([0.5, 0.2, 0.0], dtype=torch.float64)
    batched = displacement(params, s_src, s_src, s_b)
    for i in range(3):
        single = MomentumParams(params.velocities[i : i + 1], params.logits[i : i + 1], params.log_gammas[i : i + 1])
        one = displacement(single, float(s_src[i]), float(s_src[i]), float(s_b[i]))
        torch.testing.assert_close(batched[i : i + 1], one, rtol=1e-12, atol=1e-12)


def test_additivity():
    params = random_params(8, 4, 2, seed=11)
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    via_b = integrate(integrate(x, params, 0.8, 0.8, 0.45), params, 0.8, 0.45, 0.1)
    direct = integrate(x, params, 0.8, 0.8, 0.1)
    torch.testing.assert_close(via_b, direct, rtol=1e-12, atol=1e-12)


def test_k1_is_an_euler_step():
    v = torch.randn(2, 1, 4, 5, dtype=torch.float64)
    params = MomentumParams(v, torch.randn(2, 1, 1, 5, dtype=torch.float64), torch.zeros(2, 0, 1, 5, dtype=torch.float64))
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    assert torch.equal(integrate(x, params, 1.0, 1.0, 0.25), x - 0.75 * v[:, 0])
    sigmas = torch.tensor([1.0, 0.8, 0.5, 0.25], dtype=torch.float64)
    ubar = average_velocities(params, 1.0, sigmas)
    for j in range(3):
        torch.testing.assert_close(ubar[:, j], v[:, 0], rtol=0, atol=1e-15)


def test_average_velocities_reassemble_the_displacement():
    params = random_params(8, 6, 3, seed=2)
    sigmas = torch.tensor([0.7, 0.66, 0.5, 0.5, 0.31, 0.0], dtype=torch.float64)  # includes a zero-length step
    ubar = average_velocities(params, 0.7, sigmas)
    lengths = (sigmas[:-1] - sigmas[1:]).view(1, -1, 1, 1)
    torch.testing.assert_close((ubar * lengths).sum(1), displacement(params, 0.7, 0.7, 0.0), rtol=1e-12, atol=1e-12)
    # A zero-length sub-step's mean velocity is the instantaneous velocity there.
    torch.testing.assert_close(ubar[:, 2], velocity_at(params, 0.7, 0.5), rtol=1e-12, atol=1e-12)
    for j in range(5):
        if lengths[0, j, 0, 0] > 0:
            step = displacement(params, 0.7, sigmas[j].item(), sigmas[j + 1].item()) / lengths[0, j]
            torch.testing.assert_close(ubar[:, j], step, rtol=1e-12, atol=1e-12)


def test_phi_against_high_precision():
    mpmath.mp.dps = 50
    zs = [0.0, 1e-15, -1e-10, 1e-7, -5e-4, 9.99e-4, 1e-3, -1.5e-3, 0.1, -3.0, 20.0, -40.0]
    ours = phi(torch.tensor(zs, dtype=torch.float64))
    for z, value in zip(zs, ours.tolist()):
        exact = float(mpmath.expm1(z) / z) if z != 0 else 1.0
        assert abs(value - exact) <= 1e-14 * abs(exact), (z, value, exact)
    ours32 = phi(torch.tensor(zs, dtype=torch.float32)).double()
    for z, value in zip(zs, ours32.tolist()):
        exact = float(mpmath.expm1(z) / z) if z != 0 else 1.0
        assert abs(value - exact) <= 3e-7 * abs(exact), (z, value, exact)


@pytest.mark.parametrize("value", [0.0, 1e-12, -1e-7, 5e-4, -9.999e-4])
def test_gradients_finite_at_and_near_zero(value):
    params = random_params(3, 4, 1, seed=7, special=False)
    g = torch.full_like(params.log_gammas, value).requires_grad_(True)
    v = params.velocities.clone().requires_grad_(True)
    out = displacement(MomentumParams(v, params.logits, g), 1.0, 1.0, 0.5)
    out.sum().backward()
    assert torch.isfinite(g.grad).all() and torch.isfinite(v.grad).all()
    # d/dg of pi v d phi(g d) at g -> 0 is pi v d^2 / 2: check the analytic value.
    if abs(value) < 1e-6:
        pi = torch.softmax(params.logits, dim=1)
        expected = (pi[:, 1:] * params.velocities[:, 1:].sum(2, keepdim=True) * 0.25 / 2)
        torch.testing.assert_close(g.grad, expected, rtol=1e-5, atol=1e-9)


def test_gradcheck_across_the_series_threshold():
    params = random_params(2, 2, 1, n=1, batch=1, seed=9, special=False)
    for g0 in (0.0, 9e-4, 1.1e-3):
        g = torch.full_like(params.log_gammas, g0).requires_grad_(True)
        fn = lambda gg: displacement(MomentumParams(params.velocities, params.logits, gg), 1.0, 1.0, 0.6)
        assert torch.autograd.gradcheck(fn, (g,), eps=1e-7, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_integrate_in_float32(dtype):
    params = random_params(8, 4, 2, seed=4, dtype=torch.float32, special=False)
    low = MomentumParams(params.velocities.to(dtype), params.logits.to(dtype), params.log_gammas.to(dtype))
    out = displacement(low, 1.0, 1.0, 0.5)
    assert out.dtype == torch.float32
    upcast = MomentumParams(*(t.to(dtype).float() for t in (params.velocities, params.logits, params.log_gammas)))
    torch.testing.assert_close(out, displacement(upcast, 1.0, 1.0, 0.5), rtol=0, atol=0)
    # A bf16 log-gamma near 0 would make expm1(z)/z in bf16 meaningless; in float32 it is exact.
    assert average_velocities(low, 1.0, torch.tensor([1.0, 0.9, 0.5])).dtype == torch.float32


def test_shape_validation():
    v = torch.zeros(2, 4, 6, 3)
    with pytest.raises(ValueError, match="groups"):
        MomentumParams(v, torch.zeros(2, 4, 4, 3), torch.zeros(2, 3, 4, 3))
    with pytest.raises(ValueError, match="log_gammas"):
        MomentumParams(v, torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 3, 3))
