"""`arcflow sample --adapter RUN`: the few-step student from the shell, on a tiny real run."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from cli_helpers import CLI_ENV as ENV
from cli_helpers import assert_one_line_error
from cli_helpers import run_in_process as cli
from dataset_factory import make_dataset, train_tiny_run
from PIL import Image
from reference_sampling import reference_sample

PROMPT = "a handwritten digit 3"
STEPS = 4  # teacher steps of --compare-teacher (kept small)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real student run (digits teacher, K=2, rank 2), trained for a few iterations in-process."""
    root = tmp_path_factory.mktemp("sample")
    dataset = make_dataset(root / "ds", num_samples=32, steps=4, shard_size=16)
    train_tiny_run(dataset, root / "run")
    return root / "run"


@pytest.fixture(scope="module")
def loaded(run):
    from arcflow.distill.runs import load_run

    return load_run(run)


def sample(capsys, out, *args):
    code, stdout, err = cli(capsys, "sample", "--out", out, *args)
    assert code == 0, err
    assert out.is_file() and f"to {out}" in stdout
    return np.load(out) if out.suffix == ".npy" else Image.open(out)


def student(capsys, tmp_path, run, name, *extra, seed=0, num=4):
    return sample(capsys, tmp_path / name, "--adapter", run, "--prompt", PROMPT, "--num", num, "--seed", seed, *extra)


def test_png_grid(run, tmp_path, capsys):
    image = student(capsys, tmp_path, run, "x.png")
    assert image.format == "PNG" and image.mode == "L"
    assert image.size == (2 + 2 * 66, 2 + 2 * 66)  # 4 images of 8x8 (64 px cells): a 2x2 grid


def test_npy_is_the_run_sampled_from_seed_plus_i(run, loaded, tmp_path, capsys):
    arr = student(capsys, tmp_path, run, "a.npy")
    assert arr.dtype == np.float32 and arr.shape == (4, 8, 8)
    assert arr.min() >= 0.0 and arr.max() <= 1.0 and arr.std() > 0.01
    again = student(capsys, tmp_path, run, "b.npy")
    np.testing.assert_array_equal(arr, again)  # the same seed gives the same images
    other = student(capsys, tmp_path, run, "c.npy", seed=1)
    assert np.abs(other - arr).max() > 0.05
    np.testing.assert_array_equal(other[:3], arr[1:])  # sample i uses seed + i: batch-independent
    expected = loaded.teacher.decode(loaded.sample_latents([PROMPT] * 4, [0, 1, 2, 3]))[:, 0].numpy()
    np.testing.assert_allclose(arr, expected, atol=1e-5)


def test_merged_lora_samples_like_the_unmerged_student(run, loaded):
    """load_run folds LoRA into the base weights for speed; the samples must not change."""
    from arcflow.distill.runs import load_run
    from safetensors.torch import load_file

    lora = load_file(str(run / "pytorch_lora_weights.safetensors"))
    assert max(float(v.abs().max()) for k, v in lora.items() if "lora_B" in k) > 0  # a real LoRA delta
    unmerged = load_run(run, merge_lora=False)
    seeds = [5, 6, 7]
    a = loaded.sample_latents([PROMPT] * 3, seeds)
    b = unmerged.sample_latents([PROMPT] * 3, seeds)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_compare_teacher_adds_the_teachers_sample_from_the_same_noise(run, tmp_path, capsys):
    both = student(capsys, tmp_path, run, "both.npy", "--compare-teacher", "--steps", STEPS)
    alone = student(capsys, tmp_path, run, "alone.npy")
    teacher = sample(capsys, tmp_path / "teacher.npy", "--teacher", "digits", "--prompt", PROMPT, "--num", 4,
                     "--seed", 0, "--steps", STEPS)
    assert both.shape == (8, 8, 8) and both.dtype == np.float32
    np.testing.assert_array_equal(both[:4], alone)
    np.testing.assert_array_equal(both[4:], teacher)
    grid = student(capsys, tmp_path, run, "both.png", "--compare-teacher", "--steps", STEPS)
    assert grid.size == (2 + 4 * 66, 2 + 2 * 66)  # student row above the teacher row


def test_nfe_1(run, loaded, tmp_path, capsys):
    one = student(capsys, tmp_path, run, "one.npy", "--nfe", 1)
    two = student(capsys, tmp_path, run, "two.npy")
    assert one.shape == (4, 8, 8) and 0.0 <= one.min() and one.max() <= 1.0
    assert np.abs(one - two).max() > 1e-3
    expected = loaded.teacher.decode(loaded.sample_latents([PROMPT] * 4, [0, 1, 2, 3], nfe=1))[:, 0].numpy()
    np.testing.assert_allclose(one, expected, atol=1e-5)


def test_unknown_prompt_is_one_line_before_loading_the_student(run, tmp_path):
    """A real subprocess (what a user sees): no log lines from building the student, no traceback."""
    out = tmp_path / "x.png"
    res = subprocess.run([sys.executable, "-m", "arcflow.cli", "sample", "--adapter", str(run), "--prompt",
                          "a photo of a cat", "--out", str(out)], capture_output=True, text=True, timeout=120, env=ENV)
    assert_one_line_error(res.returncode, res.stderr, "a photo of a cat")
    assert not out.exists()


@pytest.mark.parametrize("case", ["empty-dir", "missing", "bad-json", "num-0", "jpg", "compare-no-adapter",
                                  "nfe-no-adapter", "nfe-0", "steps-0"])
def test_bad_input_is_one_line(run, tmp_path, capsys, case):
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "arcflow_config.json").write_text("{not json")
    out = tmp_path / "x.png"
    args, needle = {
        "empty-dir": (["--adapter", empty], "not a student run"),
        "missing": (["--adapter", tmp_path / "nope"], "not a student run"),
        "bad-json": (["--adapter", broken], "JSON"),
        "num-0": (["--adapter", run, "--num", 0], "--num"),
        "jpg": (["--adapter", run], "--out"),
        "compare-no-adapter": (["--compare-teacher"], "--adapter"),
        "nfe-no-adapter": (["--nfe", 1], "--adapter"),
        "nfe-0": (["--adapter", run, "--nfe", 0], "--nfe"),
        "steps-0": (["--adapter", run, "--compare-teacher", "--steps", 0], "--steps"),
    }[case]
    if case == "jpg":
        out = tmp_path / "x.jpg"
    code, _, err = cli(capsys, "sample", "--prompt", PROMPT, "--out", out, *args)
    assert_one_line_error(code, err, needle)
    assert not out.exists()


def test_unknown_prompt_in_process(run, tmp_path, capsys):
    code, _, err = cli(capsys, "sample", "--adapter", run, "--prompt", "a handwritten digit 12", "--out",
                       tmp_path / "x.npy")
    assert_one_line_error(code, err, "digit 12")
    assert not (tmp_path / "x.npy").exists()


def test_samples_on_the_runs_recorded_segment_sigmas(run, loaded, tmp_path, capsys):
    """The student integrates over its scheduler's segment boundaries (recorded at training), not a
    fresh schedule (a run recorded at other boundaries: both files agree, as sampling requires)."""
    import shutil

    from diffusers.schedulers.scheduling_utils import SCHEDULER_CONFIG_NAME

    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    record = json.loads((moved / "arcflow_config.json").read_text())
    scheduler = json.loads((moved / SCHEDULER_CONFIG_NAME).read_text())
    assert len(record["segment_sigmas"]) == 3 and scheduler["segment_sigmas"] == record["segment_sigmas"]
    scheduler["segment_sigmas"] = record["segment_sigmas"] = [1.0, 0.8, 0.0]
    (moved / SCHEDULER_CONFIG_NAME).write_text(json.dumps(scheduler))
    (moved / "arcflow_config.json").write_text(json.dumps(record))
    arr = sample(capsys, tmp_path / "m.npy", "--adapter", moved, "--prompt", PROMPT, "--num", 2, "--seed", 0)
    noise = loaded.teacher.noise([0, 1])
    cond = loaded.teacher.encode_prompts([PROMPT] * 2)
    with torch.no_grad():
        custom = reference_sample(loaded.student, noise, cond, nfe=2, sigmas=torch.tensor([1.0, 0.8, 0.0], dtype=torch.float64))
        default = reference_sample(loaded.student, noise, cond, nfe=2, sigmas=loaded.teacher.sigmas(2))
    np.testing.assert_allclose(arr, loaded.teacher.decode(custom)[:, 0].numpy(), atol=1e-5)
    assert np.abs(arr - loaded.teacher.decode(default)[:, 0].numpy()).max() > 1e-3
