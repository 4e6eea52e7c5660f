import copy
import json
import logging
import math

import pytest
import safetensors
import safetensors.torch
import torch
from arcflow.distill.loss import segment_batch, segment_loss
from arcflow.distill.momentum import displacement, velocity_at
from arcflow.distill.student import (
    HEAD_FILE,
    LORA_FILE,
    STUDENT_CONFIG_FILE,
    TRAINABLE_FILE,
    MomentumHead,
    StudentConfig,
    build_student,
    load_student,
    save_student,
    soft_clamp,
)
from arcflow.core.errors import ArcflowError
from tiny_flux import FLUX_DEV_CONFIG, TinyFluxTeacher
from torch import nn
from reference_sampling import reference_sample

logger = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def teacher():
    return TinyFluxTeacher(seed=0)


@pytest.fixture(scope="module")
def cond(teacher):
    return teacher.encode_prompts(["a cat", "a dog", "a tree"])


@pytest.fixture(scope="module")
def noise(teacher):
    return teacher.noise([1, 2, 3])


def _perturb(student, scale=0.05, seed=1):
    """Random non-zero trainable weights (LoRA B starts at zero, which would hide LoRA bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def test_k1_student_at_init_is_the_teachers_euler_step(teacher, cond, noise):
    student = build_student(teacher, StudentConfig(momentum=True, k=1))
    with torch.no_grad():
        u = teacher.velocity(noise, torch.ones(3), cond, guidance=1.0)
        out = reference_sample(student, noise, cond, nfe=1)
        torch.testing.assert_close(out, noise - 1.0 * u, rtol=0, atol=1e-6)
        # Two segments: two Euler steps of the teacher.
        x_mid = noise - 0.5 * u
        u_mid = teacher.velocity(x_mid, torch.full((3,), 0.5), cond, guidance=1.0)
        torch.testing.assert_close(reference_sample(student, noise, cond, nfe=2), x_mid - 0.5 * u_mid, rtol=0, atol=1e-6)


def test_k8_student_at_init_is_close_to_the_teacher(teacher, cond, noise):
    student = build_student(teacher, StudentConfig(k=8, momentum=True))
    with torch.no_grad():
        u = teacher.velocity(noise, torch.ones(3), cond, guidance=1.0)
        params = student(noise, torch.ones(3), cond)
        v0 = velocity_at(params, 1.0, 1.0).transpose(1, 2)
        torch.testing.assert_close(v0, u, rtol=0, atol=1e-2 * float(u.abs().max()))
        # Over a whole 1-segment step the spread of momentum modes bends the path by ~10%.
        step = displacement(params, 1.0, 1.0, 0.0).transpose(1, 2)
        assert float((step - u).norm() / u.norm()) < 0.15
        log_gammas = params.log_gammas[0, :, 0, 0]
        expected = torch.linspace(math.log(0.2), math.log(4.0), 7)
        torch.testing.assert_close(log_gammas, expected, rtol=0, atol=1e-5)
        assert torch.equal(params.logits, torch.zeros_like(params.logits))


def test_prediction_layout_and_weight_groups(teacher, cond, noise):
    student = build_student(teacher, StudentConfig(momentum=True, k=3, weight_groups=2))
    params = student(noise, torch.ones(3), cond)
    assert params.velocities.shape == (3, 3, 4, 16)
    assert params.logits.shape == (3, 3, 2, 16)
    assert params.log_gammas.shape == (3, 2, 2, 16)


def test_no_momentum_student_has_zero_log_gammas(teacher, cond, noise):
    student = build_student(teacher, StudentConfig(k=4, momentum=False))
    _perturb(student)
    params = student(noise, torch.full((3,), 0.7), cond)
    assert params.log_gammas.shape == (3, 3, 1, 16)
    assert torch.equal(params.log_gammas, torch.zeros_like(params.log_gammas))
    assert student.head.log_gamma is None


def test_log_gammas_are_soft_clamped(teacher, cond, noise):
    student = build_student(teacher, StudentConfig(k=4, momentum=True, log_gamma_bound=3.0))
    with torch.no_grad():
        student.head.log_gamma.weight.fill_(1e6)
        student.head.log_gamma.bias.fill_(-1e7)
    with torch.no_grad():
        params = student(noise, torch.ones(3), cond)
    assert bool(params.log_gammas.isfinite().all())
    assert float(params.log_gammas.abs().max()) <= 3.0
    assert float(params.log_gammas.abs().max()) > 2.99
    assert soft_clamp(torch.tensor([1e30, -1e30, 0.0]), 6.0).tolist() == [6.0, -6.0, 0.0]


def test_trainable_parameters_per_mode(teacher):
    default = build_student(teacher, StudentConfig(k=4, momentum=True))
    names = {n for n, p in default.named_parameters() if p.requires_grad}
    assert names and all(".lora_" in n or n.startswith("transformer.proj_out.") for n in names)
    assert {n for n in names if n.startswith("transformer.proj_out.")} == {
        f"transformer.proj_out.{m}.{w}" for m in ("velocity", "logits", "log_gamma") for w in ("weight", "bias")
    }
    assert all(p.requires_grad for n, p in default.named_parameters() if ".lora_" in n)
    # The top-level proj_out is the head, never LoRA-wrapped; the other targets are.
    assert isinstance(default.transformer.proj_out, MomentumHead)
    wrapped = {n for n, m in default.transformer.named_modules() if hasattr(m, "lora_A")}
    assert not any(n == "proj_out" or n.startswith("proj_out.") for n in wrapped)
    assert wrapped == {
        "transformer_blocks.0.ff.net.0.proj",
        "transformer_blocks.0.ff.net.2",
        "transformer_blocks.0.ff_context.net.0.proj",
        "transformer_blocks.0.ff_context.net.2",
        "single_transformer_blocks.0.proj_mlp",
        "single_transformer_blocks.0.proj_out",
        "time_text_embed.timestep_embedder.linear_1",
        "time_text_embed.timestep_embedder.linear_2",
    }
    heads = build_student(teacher, StudentConfig(momentum=True, k=4, trainable="heads"))
    assert {n for n, p in heads.named_parameters() if p.requires_grad} == {
        n for n, _ in heads.named_parameters() if n.startswith("transformer.proj_out.")
    }
    assert not any(".lora_" in n for n, _ in heads.named_parameters())
    full = build_student(teacher, StudentConfig(momentum=True, k=4, trainable="full"))
    assert all(p.requires_grad for p in full.parameters())
    assert not any(".lora_" in n for n, _ in full.named_parameters())
    assert 0 < heads.trainable_share() < default.trainable_share() < full.trainable_share() == 1.0
    # The teacher stays untouched and usable.
    assert isinstance(teacher.transformer.proj_out, nn.Linear)
    assert not any(hasattr(m, "lora_A") for m in teacher.transformer.modules())
    assert all(p.requires_grad for p in teacher.transformer.parameters())  # not frozen by the copy


def test_inplace_build_adapts_the_teachers_own_transformer():
    own = TinyFluxTeacher(seed=3)
    student = build_student(own, StudentConfig(momentum=True, k=2), inplace=True)
    assert student.transformer is own.transformer
    assert isinstance(own.transformer.proj_out, MomentumHead)
    with pytest.raises(ArcflowError, match="weight_groups"):
        build_student(TinyFluxTeacher(seed=3), StudentConfig(momentum=True, k=2, weight_groups=3))


def test_flux_dev_default_recipe_trains_under_five_percent():
    with torch.device("meta"):
        big = TinyFluxTeacher(config=FLUX_DEV_CONFIG, grid=(64, 64))
        student = build_student(big, StudentConfig())
    share = student.trainable_share()
    logger.info("FLUX.1-dev default recipe: %s", student.describe_trainable())
    assert share < 0.05, student.describe_trainable()
    wrapped = [n for n, m in student.transformer.named_modules() if hasattr(m, "lora_A")]
    assert len(wrapped) == 19 * 4 + 38 * 2 + 2
    assert isinstance(student.transformer.proj_out, MomentumHead)
    assert student.head.velocity.out_features == 8 * 64


def _trajectory_batch(teacher, n=6, steps=8, seed=10):
    noise = teacher.noise(range(seed, seed + n))
    cond = teacher.encode_prompts([f"prompt {i}" for i in range(n)])
    x, u, sigmas = teacher.euler_trajectories(noise, cond, steps)
    extras = {"sample_id": torch.arange(n), "seed": torch.arange(n), "guidance": torch.ones(n)}
    return {"x": x, "u": u, "sigmas": sigmas, **cond, **extras}


def _items(batch, bounds, segments):
    cond = {k: batch[k] for k in ("prompt_embeds", "pooled_prompt_embeds")}
    return segment_batch(batch["x"], batch["u"], batch["sigmas"], bounds, segments, cond)


def test_segment_loss_matches_a_direct_per_sample_computation(teacher):
    batch = _trajectory_batch(teacher, n=4)
    student = build_student(teacher, StudentConfig(momentum=True, k=3))
    _perturb(student)
    bounds = [0, 2, 8]  # unequal segments exercise the padding
    segments = torch.tensor([1, 0, 1, 0])
    with torch.no_grad():
        loss, per_segment = segment_loss(student, _items(batch, bounds, segments), 2)
        sig = batch["sigmas"]
        expected = []
        for b, seg in enumerate(segments.tolist()):
            j0, j1 = bounds[seg], bounds[seg + 1]
            cond = {k: batch[k][b : b + 1] for k in ("prompt_embeds", "pooled_prompt_embeds")}
            s_src = sig[j0].reshape(1)
            params = student(batch["x"][b : b + 1, j0], s_src, cond)
            total = 0.0
            for j in range(j0, j1):
                d = float(sig[j] - sig[j + 1])
                ubar = displacement(params, s_src, sig[j], sig[j + 1]).transpose(1, 2) / d
                total = total + d / float(sig[j0] - sig[j1]) * (ubar - batch["u"][b : b + 1, j]).pow(2).mean()
            expected.append(total)
        expected = torch.stack(expected)
    torch.testing.assert_close(loss, expected.mean(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(
        per_segment, torch.stack([expected[segments == 0].mean(), expected[segments == 1].mean()]), rtol=1e-4, atol=1e-7
    )
    with torch.no_grad():
        single, per_single = segment_loss(student, _items(batch, bounds, torch.zeros(4, dtype=torch.long)), 2)
    assert per_single[1].isnan() and torch.isclose(single, per_single[0])


def test_loss_decreases_with_adamw(teacher):
    batch = _trajectory_batch(teacher, n=8)
    torch.manual_seed(0)
    student = build_student(teacher, StudentConfig(momentum=True, k=4, lora_rank=4))
    opt = torch.optim.AdamW(student.trainable_parameters(), lr=3e-3)
    segments = torch.arange(8) % 2
    losses = []
    for _ in range(30):
        loss, per_segment = segment_loss(student, _items(batch, [0, 4, 8], segments), 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert per_segment.shape == (2,)
    logger.info("loss over 30 AdamW steps: %.3g -> %.3g", losses[0], losses[-1])
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("trainable", ["lora+heads", "heads", "full"])
def test_save_load_round_trip_is_exact(teacher, cond, noise, tmp_path, trainable):
    config = StudentConfig(momentum=True, k=4, weight_groups=2, lora_rank=4, lora_alpha=8.0, trainable=trainable)
    student = build_student(teacher, config)
    _perturb(student)
    run = save_student(student, tmp_path / "run", {"dataset": {"fingerprint": "abc"}, "training": {"lr": 1e-3}})
    record = json.loads((run / STUDENT_CONFIG_FILE).read_text())
    assert record["student"] == config.to_dict()
    assert record["teacher"] == {"id": "tiny-flux", "revision": "seed-0"}
    assert record["k"] == 4 and record["nfe"] == 2 and record["shift"] == 1.0
    assert record["dataset"] == {"fingerprint": "abc"}
    assert (run / HEAD_FILE).is_file()
    assert (run / LORA_FILE).is_file() == (trainable == "lora+heads")
    assert (run / TRAINABLE_FILE).is_file() == (trainable == "full")
    assert not list(run.glob("*.bin")) and not list(run.glob("*.pt"))

    loaded = load_student(teacher, run)
    sigma = torch.full((3,), 0.6)
    with torch.no_grad():
        a, b = student(noise, sigma, cond), loaded(noise, sigma, cond)
        for name in ("velocities", "logits", "log_gammas"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert torch.equal(reference_sample(student, noise, cond), reference_sample(loaded, noise, cond))


def test_load_student_errors(teacher, tmp_path):
    with pytest.raises(ArcflowError, match="not a student run directory"):
        load_student(teacher, tmp_path)
    run = save_student(build_student(teacher, StudentConfig(momentum=True, k=2)), tmp_path / "run", {})
    with pytest.raises(ArcflowError, match="revision"):
        load_student(TinyFluxTeacher(seed=1), run)
    with pytest.raises(ValueError, match="contradicts"):
        save_student(build_student(teacher, StudentConfig(momentum=True, k=2)), tmp_path / "other", {"k": 3})
    save_student(build_student(teacher, StudentConfig(momentum=True, k=2)), tmp_path / "same", {"k": 2, "nfe": 2})


def test_saved_lora_loads_through_diffusers_with_alpha(teacher, cond, noise, tmp_path):
    config = StudentConfig(momentum=True, k=2, lora_rank=4, lora_alpha=8.0)
    student = build_student(teacher, config)
    _perturb(student)
    run = save_student(student, tmp_path / "run", {})
    with safetensors.safe_open(str(run / LORA_FILE), "pt") as f:  # diffusers' save_lora_adapter format
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        assert all(".lora_" in k and not k.startswith("transformer.") for k in f.keys())
    assert meta["r"] == 4 and meta["lora_alpha"] == 8.0

    fresh = copy.deepcopy(teacher.transformer)
    fresh.load_lora_adapter(str(run), weight_name=LORA_FILE, prefix=None, adapter_name="loaded")
    layer = fresh.single_transformer_blocks[0].proj_mlp
    assert layer.scaling["loaded"] == pytest.approx(2.0)  # alpha / r survived the round trip
    fresh.proj_out = copy.deepcopy(student.head)
    inputs = teacher.transformer_inputs(noise, torch.full((3,), 0.4), cond)
    with torch.no_grad():
        expected = student.transformer(**inputs)[0]
        got = fresh(**inputs)[0]
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("trainable", ["lora+heads", "full"])
def test_the_same_student_exports_the_same_bytes(teacher, tmp_path, trainable):
    """safetensors orders metadata by a hash map seeded anew for each file: every export of one
    student (and every ``save_safetensors``) must still give the same bytes."""
    from arcflow.core.files import save_safetensors

    student = build_student(teacher, StudentConfig(momentum=True, k=2, lora_rank=4, trainable=trainable))
    _perturb(student)
    runs = [save_student(student, tmp_path / f"run{i}", {}) for i in range(6)]
    for name in (LORA_FILE, HEAD_FILE, TRAINABLE_FILE):
        if (runs[0] / name).exists():
            assert len({(run / name).read_bytes() for run in runs}) == 1, name
    metadata = {"format": "pt", "b": "1", "a": "2", "lora_adapter_metadata": "{}"}
    for i in range(6):
        save_safetensors({"w": torch.ones(3), "v": torch.zeros(2)}, tmp_path / f"w{i}.safetensors", metadata)
    assert len({(tmp_path / f"w{i}.safetensors").read_bytes() for i in range(6)}) == 1
    with safetensors.safe_open(str(tmp_path / "w0.safetensors"), "pt") as f:
        assert f.metadata() == metadata and torch.equal(f.get_tensor("w"), torch.ones(3))


def test_lora_targets_are_written_in_one_order_whatever_the_sets_order(teacher, tmp_path):
    """peft keeps target_modules as a set, which diffusers writes in the set's (hash-seeded) order."""
    from arcflow.distill.student import saving

    targets = ["ff.net.2", "proj_mlp", "ff_context.net.2", "attn.to_q"]  # a list: peft keeps it as a set
    student = build_student(teacher, StudentConfig(momentum=True, k=2, lora_rank=4, lora_targets=targets))
    run = save_student(student, tmp_path / "run", {})
    path = run / LORA_FILE
    with safetensors.safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    # the names of the linear layers the targets match (distill/student/config.py), in sorted order
    assert meta["target_modules"] == sorted(meta["target_modules"]) and len(meta["target_modules"]) > len(targets)
    assert all(name.split(".", 1)[-1].endswith(tuple(targets)) or name.endswith(tuple(targets))
               for name in meta["target_modules"])
    written = path.read_bytes()
    shuffled = {**meta, "target_modules": meta["target_modules"][::-1]}
    safetensors.torch.save_file(tensors, str(path), {"lora_adapter_metadata": json.dumps(shuffled), "format": "pt"})
    saving._canonical_lora_file(path)
    assert path.read_bytes() == written


def test_student_config_round_trip_and_validation():
    config = StudentConfig(momentum=True, k=3, lora_rank=8, lora_targets=["ff.net.2"])
    assert config.lora_alpha == 8.0
    data = json.loads(json.dumps(config.to_dict()))
    assert StudentConfig.from_dict(data) == config
    with pytest.raises(ArcflowError, match="unknown"):
        StudentConfig.from_dict({**data, "bogus": 1})
    with pytest.raises(ArcflowError, match="trainable"):
        StudentConfig(trainable="everything")
