"""The embedded digits teacher, the recording sampler and their CLI commands."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from arcflow.pipeline.classifier import load_digits_classifier
from arcflow.pipeline.digits import DigitsTeacher, load_digits_teacher
from arcflow.pipeline.digits_data import (
    digits_split,
    images_to_latents,
    latents_to_images,
)
from arcflow.pipeline.digits_training import train_digits
from arcflow.pipeline.recording import record_trajectories, sample_teacher
from arcflow.core.errors import ArcflowError
from cli_helpers import assert_process_failed_one_line
from cli_helpers import run_subprocess as run_cli


@pytest.fixture(scope="module")
def teacher() -> DigitsTeacher:
    return load_digits_teacher()


def test_split_is_seeded_and_disjoint():
    a, b = digits_split(0), digits_split(0)
    assert torch.equal(a.heldout_images, b.heldout_images)
    assert len(a.train_images) + len(a.heldout_images) == 1797
    assert 340 <= len(a.heldout_images) <= 380
    assert set(a.heldout_labels.tolist()) == set(range(10))
    train = {tuple(x.flatten().tolist()) for x in a.train_images}
    overlap = sum(tuple(x.flatten().tolist()) in train for x in a.heldout_images)
    assert overlap < 5  # sklearn's digits hold very few exact duplicates


def test_latent_packing_round_trips():
    images = digits_split().train_images[:4]
    latents = images_to_latents(images)
    assert latents.shape == (4, 16, 4) and latents.min() >= -1 and latents.max() <= 1
    assert torch.allclose(latents_to_images(latents), images)


def test_prompts_and_validation(teacher):
    assert teacher.prompt_set() == [f"a handwritten digit {d}" for d in range(10)]
    teacher.validate_prompts(["a handwritten digit 7", "A  Handwritten digit 0 ", ""])
    with pytest.raises(ArcflowError) as err:
        teacher.validate_prompts(["a photo of a cat"])
    assert "\n" not in str(err.value) and "a handwritten digit 9" in str(err.value)
    cond = teacher.encode_prompts(["a handwritten digit 1", ""])
    assert cond["prompt_embeds"].shape[0] == 2 and cond["pooled_prompt_embeds"].ndim == 2


def test_recording_is_exact_euler(teacher):
    cond = teacher.encode_prompts(["a handwritten digit 3", "a handwritten digit 8", "a handwritten digit 0"])
    noise = teacher.noise([1, 2, 3])
    x, u, sigmas = record_trajectories(teacher, cond, noise, steps=6, guidance=3.0)
    assert x.shape == (3, 7, 16, 4) and u.shape == (3, 6, 16, 4) and sigmas.shape == (7,)
    assert x.dtype == u.dtype == sigmas.dtype == torch.float32
    assert sigmas[0] == 1 and sigmas[-1] == 0
    assert torch.equal(x[:, 0], noise)
    for j in range(6):
        assert torch.equal(x[:, j + 1], x[:, j] - (sigmas[j] - sigmas[j + 1]) * u[:, j])


def test_same_seed_bit_identical_in_any_batch(teacher):
    def trajectories(seeds: list[int]) -> dict[int, torch.Tensor]:
        prompts = [f"a handwritten digit {s % 10}" for s in seeds]
        x, u, _ = record_trajectories(teacher, teacher.encode_prompts(prompts), teacher.noise(seeds), steps=4)
        return {s: torch.cat([x[i].flatten(), u[i].flatten()]) for i, s in enumerate(seeds)}

    alone = trajectories([7])
    small = trajectories([5, 7, 9])
    large = trajectories([*range(100, 120), 9, 7, 5])  # other positions, spans two micro-batches
    for seed in (5, 7, 9):
        assert torch.equal(small[seed], large[seed])
    assert torch.equal(alone[7], small[7])
    final = sample_teacher(teacher, ["a handwritten digit 7"] * 2, [7, 8], steps=4)
    assert torch.equal(final[0], alone[7][: 5 * 64].reshape(5, 16, 4)[-1])


def test_guidance_one_is_the_conditional_velocity(teacher):
    cond = teacher.encode_prompts(["a handwritten digit 4", "a handwritten digit 5"])
    x, sigma = teacher.noise([0, 1]), torch.full((2,), 0.6)
    with torch.no_grad():
        assert torch.equal(teacher.velocity(x, sigma, cond, 1.0), teacher.conditional_velocity(x, sigma, cond))


def test_guided_velocity_is_cfg_of_two_forwards(teacher):
    cond = teacher.encode_prompts(["a handwritten digit 2", "a handwritten digit 6"])
    x, sigma, g = teacher.noise([3, 4]), torch.tensor([0.9, 0.3]), 3.5
    with torch.no_grad():
        u_cond = teacher.conditional_velocity(x, sigma, cond)
        u_uncond = teacher.conditional_velocity(x, sigma, teacher.unconditional(cond))
        guided = teacher.velocity(x, sigma, cond, g)
    assert not torch.allclose(u_cond, u_uncond, atol=1e-3)
    torch.testing.assert_close(guided, u_uncond + g * (u_cond - u_uncond), atol=1e-5, rtol=1e-5)


def test_shipped_weights_draw_the_prompted_digit(teacher):
    """100 samples (10 per digit) at the full 50 steps and default guidance: >= 90% accuracy."""
    classifier = load_digits_classifier()
    digits = list(range(10)) * 10
    latents = sample_teacher(teacher, [f"a handwritten digit {d}" for d in digits], range(500, 600), steps=50)
    accuracy = (classifier.predict(teacher.decode(latents)) == torch.tensor(digits)).float().mean().item()
    assert accuracy >= 0.9
    assert len(teacher.revision) == 16


def test_cli_sample_writes_npy_and_png(tmp_path):
    res = run_cli("sample", "--prompt", "a handwritten digit 3", "--steps", "4", "--num", "3", "--out", str(tmp_path / "s.npy"))
    assert res.returncode == 0, res.stderr
    arr = np.load(tmp_path / "s.npy")
    assert arr.shape == (3, 8, 8) and arr.dtype == np.float32 and 0 <= arr.min() and arr.max() <= 1
    res = run_cli("sample", "--steps", "2", "--num", "2", "--out", str(tmp_path / "grid.png"))
    assert res.returncode == 0, res.stderr
    from PIL import Image

    assert Image.open(tmp_path / "grid.png").size[0] > 2 * 64


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--prompt", "a photo of a cat"], "a handwritten digit 0"),
        (["--steps", "0"], "--steps"),
        (["--num", "0"], "--num"),
        (["--teacher", "nope"], "unknown teacher"),
        (["--out", "images.jpg"], ".npy"),
    ],
)
def test_cli_sample_bad_input_is_one_line(tmp_path, args, needle):
    argv = ["sample", "--out", str(tmp_path / "x.png"), *args]
    assert_process_failed_one_line(run_cli(*argv), needle)


def _hashes(directory) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_train_teacher_is_deterministic(tmp_path):
    res = run_cli("train-teacher", "--out", str(tmp_path / "a"), "--seed", "3", "--iters", "3", "--classifier-epochs", "1")
    assert res.returncode == 0, res.stderr
    train_digits(tmp_path / "b", seed=3, iters=3, classifier_epochs=1, progress=False)
    first = _hashes(tmp_path / "a")
    assert set(first) == {"digits_teacher.safetensors", "digits_teacher.json", "digits_classifier.safetensors"}
    assert first == _hashes(tmp_path / "b")
    assert load_digits_teacher(tmp_path / "a").latent_shape == (16, 4)
