"""arcflow's whole training step under ``--preset official`` held against the official formulas.

The reference below is the official code's math (``pnotp/ArcFlow``) written out on its own, cited
function by function; arcflow's step is the worker's own ``setup`` + ``train_step`` on the digits
teacher. Both start from the same student weights and use the same random draws (noise, prompts,
mixture dropout, intervals, LoRA dropout masks); the student network up to the head's input (the
teacher's transformer with peft's LoRA) is shared, everything from the head on is the reference's
own. On digits a token is one latent channel's 2x2 patch, so the official per-pixel layout
(``logweights_channels = 4`` pixels) is the token's 4 channels, one weight group each.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from arcflow.distill.on_policy import teacher_share
from arcflow.distill.presets import build_config
from arcflow.distill.run_plan import plan_run
from arcflow.distill.student.config import ADAPTER_NAME
from arcflow.distill.worker import setup, train_step
from arcflow.pipeline.registry import load_teacher

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = 1e-4  # train_cfg eps (lakonlab/models/diffusions/arcflow.py)


# ----- the official formulas ----------------------------------------------------------------------
def warp(raw, shift):
    """``ContinuousTimeStepSampler.warp_t`` (lakonlab/models/diffusions/sampler.py)."""
    return shift * raw / (1 + (shift - 1) * raw)


def official_head_init(proj, k, p2, generator):
    """``ArcFluxTransformer2DModel.init_weights(pretrained)`` (lakonlab/models/architecture/arcflow/
    arcflux.py): proj_out copied to every component, bias + N(0, 0.05^2) per component and latent
    channel shared by the patch's p2 pixels; logweights 0; log-gammas weight 0, bias
    log(logspace(0.2, 4, K-1))."""
    c = proj.out_features
    means_w = proj.weight[None].expand(k, -1, -1).reshape(k * c, -1)
    means_b = proj.bias[None].expand(k, -1).reshape(k * c)
    noise = torch.randn((k * c // p2,), generator=generator) * 0.05
    means_b = means_b + noise[:, None].expand(-1, p2).flatten()
    gammas = torch.logspace(math.log10(0.2), math.log10(4.0), k - 1, base=10)
    return means_w, means_b, torch.log(gammas)


def official_outputs(head, hidden):
    """The end of ``_ArcFluxTransformer2DModel.forward``: means, log_softmax'd logweights and raw
    (unbounded) log-gammas, laid out (B, K, C or G, N)."""
    bs, n, _ = hidden.shape
    k, c, g = head.k, head.channels, head.groups
    means = F.linear(hidden, head.velocity.weight, head.velocity.bias).reshape(bs, n, k, c)
    logweights = F.linear(hidden, head.logits.weight, head.logits.bias).reshape(bs, n, k, g).log_softmax(dim=-2)
    loggammas = F.linear(hidden, head.log_gamma.weight, head.log_gamma.bias).reshape(bs, n, k - 1, g)
    return {key: v.permute(0, 2, 3, 1) for key, v in
            (("means_u", means), ("logweights", logweights), ("loggammas", loggammas))}


def momentum_integration(sigma_src, x_start, sigma_start, raw_end, policy, shift):
    """``ArcFlowImitationBase.momentum_integration`` (lakonlab/models/diffusions/arcflow.py)."""
    bs = x_start.size(0)
    sigma_end = warp(raw_end, shift).reshape(bs, 1, 1)
    means, log_gammas, logweights = policy["means_u"], policy["loggammas"], policy["logweights"]
    dt_past = (sigma_src - sigma_start).unsqueeze(1)
    dt_step = (sigma_start - sigma_end).unsqueeze(1)
    decay = torch.exp(log_gammas * dt_past)
    decay = torch.cat([torch.ones_like(decay[:, :1]), decay], dim=1)
    x_arg = log_gammas * dt_step
    x_sign = torch.sign(x_arg)
    x_sign[x_sign == 0] = 1
    x_safe = x_sign * torch.clamp(x_arg.abs(), min=EPS)
    step_factor = torch.expm1(x_safe) / x_safe
    step_factor = torch.cat([torch.ones_like(step_factor[:, :1]), step_factor], dim=1)
    displacement = means * decay * dt_step * step_factor
    weights = torch.softmax(logweights, dim=1)
    return x_start - (weights * displacement).sum(dim=1), sigma_end


def policy_velocity(policy, sigma_src, sigma):
    """``ArcFlowPolicy.velocity`` (lakonlab/models/diffusions/policies/arcflow.py)."""
    weights = torch.softmax(policy["logweights"], dim=1)
    decay = torch.exp(policy["loggammas"] * (sigma_src - sigma).unsqueeze(1))
    decay = torch.cat([torch.ones_like(decay[:, :1]), decay], dim=1)
    return (policy["means_u"] * decay * weights).sum(dim=1)


def policy_average_u(sigma_src, x_start, sigma_start, raw_start, raw_end, total_substeps, policy, shift):
    """``ArcFlowImitationBase.policy_average_u_momentum``."""
    small = torch.round((raw_start - raw_end) * total_substeps) < 2
    x_end, sigma_end = momentum_integration(sigma_src, x_start, sigma_start, raw_end, policy, shift)
    mean_u = (x_start - x_end) / (sigma_start - sigma_end).clamp(min=EPS)
    return torch.where(small.reshape(-1, 1, 1), policy_velocity(policy, sigma_src, sigma_start), mean_u)


def dropout(policy, p, generator):
    """``ArcFlowPolicy.detach().dropout_(gm_dropout)`` (the draw from the run's generator)."""
    logweights = policy["logweights"].detach()
    mask = torch.rand(logweights.shape[:2], generator=generator) < p
    mask &= ~mask.all(dim=1, keepdim=True)
    return {"means_u": policy["means_u"].detach(), "loggammas": policy["loggammas"].detach(),
            "logweights": logweights.masked_fill(mask[:, :, None, None], float("-inf"))}


def official_loss(student, teacher, noise, cond, generator, cfg, shift):
    """``ArcFlowImitationDataFree.forward_train`` over the NFE steps, each ``piid_segment_momentum``
    with ``DiffusionMSELoss`` (0.5 x MSE, x30 by ``rescale_cfg``) weighted by the segment size; the
    teacher ``GaussianFlow`` with CFG ``pos + (g - 1)(pos - neg)`` (``guidance_jit``)."""
    head = student.head
    hidden = []
    hook = head.register_forward_hook(lambda module, args, out: hidden.append(args[0]))
    uncond = teacher.unconditional(dict(cond))

    def teacher_u(x, sigma):
        tokens = x.transpose(1, 2)
        pos = teacher.conditional_velocity(tokens, sigma, cond)
        neg = teacher.conditional_velocity(tokens, sigma, uncond)
        return (pos + (cfg["guidance"] - 1) * (pos - neg)).transpose(1, 2).float()

    bs, nfe, states = noise.shape[0], cfg["nfe"], cfg["states"]
    x_src = noise.transpose(1, 2).float()  # (B, C, N)
    raw_src = torch.ones(bs)
    total = 0.0
    for step in range(nfe):
        size = torch.tensor([1.0 / nfe])
        sigma_src = warp(raw_src, shift).reshape(bs, 1, 1)
        hidden.clear()
        student(x_src.transpose(1, 2), sigma_src.flatten(), cond)
        policy = official_outputs(head, hidden[0])
        # piid_segment_momentum
        num_substeps = (size * cfg["total_substeps"]).round().clamp(min=1)
        window = torch.minimum(cfg["window_substeps"] * size / num_substeps, size)
        raw_dst = raw_src - size
        detached = dropout(policy, cfg["gm_dropout"], generator)
        share = cfg["teacher_ratio"]
        student_iv = torch.rand((bs, states), generator=generator, dtype=torch.float64).float()
        student_iv = torch.sort(student_iv * ((1 - share) * (size - window)).unsqueeze(-1), dim=-1)[0]
        student_iv = torch.diff(student_iv, dim=-1, prepend=torch.zeros((bs, 1)))
        teacher_iv = torch.rand((bs, states - 1), generator=generator, dtype=torch.float64).float()
        teacher_iv = torch.sort(teacher_iv, dim=-1)[0]
        teacher_iv = torch.diff(teacher_iv, dim=-1, prepend=torch.zeros((bs, 1)), append=torch.ones((bs, 1)))
        teacher_iv = teacher_iv * (share * (size - window)).unsqueeze(-1)
        x, raw, sigma = x_src, raw_src, sigma_src
        preds, targets = [], []
        for j in range(states):
            raw_a = (raw - student_iv[:, j]).clamp(min=0)
            raw_b = (raw_a - teacher_iv[:, j]).clamp(min=0)
            with torch.no_grad():
                x_a, sigma_a = momentum_integration(sigma_src, x, sigma, raw_a, detached, shift)
                target = teacher_u(x_a, sigma_a.flatten())
            preds.append(policy_average_u(sigma_src, x_a, sigma_a, raw_a, raw_b - window, cfg["total_substeps"],
                                          policy, shift))
            targets.append(target)
            sigma_b = warp(raw_b, shift).reshape(bs, 1, 1)
            x = x_a + target * (sigma_b - sigma_a)
            raw, sigma = raw_b, sigma_b
        mse = (torch.cat(preds) - torch.cat(targets)).pow(2).flatten(1).mean(dim=1)  # mse_loss 'flatmean'
        loss = (mse * 0.5 * 30.0).mean()  # _forward_loss's 0.5, rescale_cfg scale 30, reduction 'mean'
        total = total + loss * size
        with torch.no_grad():
            x_src, _ = momentum_integration(sigma_src, x, sigma, raw_dst, detached, shift)
        raw_src = raw_dst.expand(bs)
    hook.remove()
    return total.squeeze()


# ----- the test -----------------------------------------------------------------------------------
def compare_step(run, config) -> tuple[dict, dict, dict, dict, tuple[float, float, float]]:
    """arcflow's ``train_step`` and the reference on its weights and draws. Returns the weights
    before and after the step, arcflow's gradients, its metrics row and the (loss, gradient abs,
    gradient rel) differences; leaves the weights where arcflow's step put them."""
    step = run.step
    start = {n: p.detach().clone() for n, p in run.params.items()}
    batch = run.stream.batch(step)  # what train_step draws: the same noise, prompts and generator
    torch.manual_seed(1234 + step)  # LoRA dropout masks
    row = train_step(run)
    grads = {n: p.grad.detach().clone() for n, p in run.params.items()}
    after = {n: p.detach().clone() for n, p in run.params.items()}

    with torch.no_grad():
        for n, p in run.params.items():
            p.copy_(start[n])
            p.grad = None
    run.student.train()
    teacher = load_teacher("digits")  # an untied copy (loading draws from torch's global generator)
    torch.manual_seed(1234 + step)
    cfg = {"guidance": 1.5, "nfe": config.student.nfe, "states": config.intermediate_states,
           "total_substeps": config.total_substeps, "window_substeps": config.window_substeps,
           "gm_dropout": config.mixture_dropout, "teacher_ratio": teacher_share(step, config.teacher_mix_iters)}
    loss = official_loss(run.student, teacher, batch["noise"], batch["cond"], batch["generator"], cfg, 1.0)
    loss.backward()
    worst_abs, worst_rel = 0.0, 0.0
    for n, p in run.params.items():
        assert p.grad is not None, f"{n}: the reference reaches every trained weight"
        err = (grads[n] - p.grad).abs().max().item()
        worst_abs = max(worst_abs, err)
        scale = p.grad.abs().max().item()
        if scale == 0:  # LoRA A at step 0: B = 0 passes it no gradient (in both)
            assert err == 0, n
        else:
            worst_rel = max(worst_rel, err / scale)
    with torch.no_grad():
        for n, p in run.params.items():
            p.copy_(after[n])
    return start, after, grads, row, (abs(row["loss"] - loss.item()) / loss.item(), worst_abs, worst_rel)


def test_official_preset_step_matches_the_official_formulas(tmp_path):
    config = build_config({"on_policy": True, "teacher": "digits", "out": str(tmp_path / "run"), "batch_size": 3,
                           "iters": 2, "progress": False}, "official")
    (tmp_path / "run").mkdir()
    run = setup(config, plan_run(config), 0, 1, torch.device("cpu"), None)
    student, head = run.student, run.student.head
    proj = load_teacher("digits").transformer.proj_out

    # init: the official head (same generator: the run's seed) and a Gaussian LoRA with alpha = r
    means_w, means_b, log_gammas = official_head_init(proj, config.student.k, 4,
                                                      torch.Generator().manual_seed(config.seed))
    assert torch.equal(head.velocity.weight, means_w) and not head.logits.weight.any() and not head.logits.bias.any()
    torch.testing.assert_close(head.velocity.bias, means_b, rtol=0, atol=1e-7)
    torch.testing.assert_close(head.log_gamma.bias, log_gammas.repeat_interleave(head.groups), rtol=0, atol=1e-6)
    assert not head.log_gamma.weight.any()
    lora = student.transformer.peft_config[ADAPTER_NAME]
    assert lora.init_lora_weights == "gaussian" and lora.lora_alpha == lora.r == 4 and lora.lora_dropout == 0.05
    with torch.no_grad():
        a = torch.cat([p.flatten() for n, p in student.named_parameters() if ".lora_A." in n])
        assert abs(float(a.std()) - 1 / lora.r) < 0.02 and abs(float(a.mean())) < 0.02  # N(0, 1/r^2): std 0.25
        assert not any(p.any() for n, p in student.named_parameters() if ".lora_B." in n)

    # step 0 from the official init: loss and every gradient, then the update
    start, after, grads, row, (loss_rel, grad_abs, grad_rel) = compare_step(run, config)
    print(f"\nstep 0: loss rel diff {loss_rel:.1e}, gradients max abs diff {grad_abs:.1e}, "
          f"max diff / max |grad| {grad_rel:.1e} ({len(grads)} tensors)")
    assert loss_rel < 2e-6 and grad_rel < 1e-4
    # the official LR at iteration 0 is 0.001 x lr (mmcv's linear warm-up), no clip before iteration 100,
    # AdamW betas (0.9, 0.95), no weight decay, log-gamma head at 0.1x: Adam's first step is lr x g / (|g| + eps)
    assert row["lr"] == pytest.approx(config.lr * 1e-3, rel=1e-12)
    for n in run.params:
        lr = config.lr * 1e-3 * (0.1 if ".log_gamma." in n else 1.0)
        expected = start[n] - lr * grads[n] / (grads[n].abs() + 1e-8)
        torch.testing.assert_close(after[n], expected, rtol=1e-6, atol=1e-9)

    # step 1 (LoRA A now has gradients; the teacher's share and the warm-up have moved)
    _, _, grads, row, (loss_rel, grad_abs, grad_rel) = compare_step(run, config)
    print(f"step 1: loss rel diff {loss_rel:.1e}, gradients max abs diff {grad_abs:.1e}, "
          f"max diff / max |grad| {grad_rel:.1e}")
    assert loss_rel < 2e-6 and grad_rel < 1e-4
    assert all(g.any() for g in grads.values())
    assert row["lr"] == pytest.approx(config.lr * (0.001 + 0.999 * 1 / config.warmup), rel=1e-12)


def test_the_clip_applies_from_grad_clip_from_and_the_warm_up_starts_at_warmup_start(tmp_path):
    from arcflow.distill.config import DistillConfig
    from arcflow.distill.optim import lr_factor
    from dataset_factory import TINY_ON_POLICY

    config = DistillConfig.from_dict({**TINY_ON_POLICY, "on_policy": True, "teacher": "digits", "out": str(tmp_path),
                                      "iters": 2, "grad_clip": 1e-6, "grad_clip_from": 1, "warmup": 4,
                                      "warmup_start": 0.25})
    run = setup(config, plan_run(config), 0, 1, torch.device("cpu"), None)
    norms = []
    for _ in range(2):
        row = train_step(run)
        after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in run.params.values()]))
        norms.append((row["grad_norm"], float(after), row["lr"]))
    (before0, after0, lr0), (before1, after1, lr1) = norms
    assert after0 == pytest.approx(before0, rel=1e-6) and before0 > 1e-3, "step 0: not clipped"
    assert after1 == pytest.approx(1e-6, rel=1e-3) and before1 > 1e-3, "step 1: clipped"
    assert (lr0, lr1) == (pytest.approx(0.25 * config.lr), pytest.approx((0.25 + 0.75 / 4) * config.lr))
    assert [lr_factor(s, 10, 0.0) for s in (0, 5, 10, 11)] == [0.0, 0.5, 1.0, 1.0]  # diffusers' schedule
