"""`arcflow evaluate` (distill/evaluate.py) on tiny real runs, its metrics, and its CLI errors.

Everything is tiny on purpose (20 samples, a 4-step teacher reference, 4 training iterations):
the figures mean nothing here; what is checked is the report's structure and that each metric is
what it says (recomputed independently where that is cheap).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from arcflow.distill.config import DistillConfig
from arcflow.distill.evaluate import (
    EvaluationConfig,
    _diversity,
    _psnr,
    evaluate,
    heldout_seeds,
    render_markdown,
)
from arcflow.distill.metrics import frechet_distance
from arcflow.distill.run_plan import DISTILL_CONFIG_FILE, plan_run
from arcflow.distill.worker import train_worker
from cli_helpers import CLI_ENV as ENV
from cli_helpers import assert_one_line_error
from cli_helpers import run_in_process as cli
from dataset_factory import make_dataset
from PIL import Image

NUM_SAMPLES = 20
TEACHER_STEPS = 4

pytestmark = pytest.mark.usefixtures("one_thread")


def train_tiny(dataset: Path, out: Path, **overrides) -> Path:
    """A real student run in this process (the trainer's own worker loop), a few iterations."""
    base = dict(dataset=str(dataset), out=str(out), iters=4, batch_size=8, lr=1e-3, warmup=1,
                checkpoint_every=4, log_every=1, lora_rank=2, k=2, progress=False)
    base.update(overrides)
    config = DistillConfig.from_dict(base)
    plan = plan_run(config)
    out.mkdir(parents=True, exist_ok=True)
    (out / DISTILL_CONFIG_FILE).write_text(json.dumps(config.to_dict()))
    train_worker(config, plan)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    dataset = make_dataset(root / "ds", num_samples=32, steps=4, shard_size=16)
    return [train_tiny(dataset, root / "arcflow", k=2), train_tiny(dataset, root / "k1", k=1)]


@pytest.fixture(scope="module")
def evaluated(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report"
    config = EvaluationConfig(adapters=[str(r) for r in runs], out=str(out), num_samples=NUM_SAMPLES,
                              teacher_steps=TEACHER_STEPS, speed_batch=8, speed_repeats=1)
    report = evaluate(config, progress=False)
    return out, report


# --- the report ---------------------------------------------------------------------------------


def test_report_files_and_rows(evaluated):
    out, report = evaluated
    for name in ("report.json", "report.md", "grid.png"):
        assert (out / name).is_file(), name
    text = (out / "report.json").read_text()
    on_disk = json.loads(text, parse_constant=lambda c: pytest.fail(f"report.json is not strict JSON: {c}"))
    names = [r["name"] for r in on_disk["rows"]]
    assert names == [f"teacher {TEACHER_STEPS}x2", "teacher 2-step Euler", "arcflow", "k1"]
    assert on_disk["grid_rows"] == names
    assert [r["nfe"] for r in on_disk["rows"]] == [2 * TEACHER_STEPS, 4, 2, 2]  # CFG doubles the teacher's calls
    assert [r["extra"].get("k") for r in on_disk["rows"][2:]] == [2, 1]
    assert on_disk["config"]["num_samples"] == NUM_SAMPLES
    assert on_disk["seed_to_seed_floor"] == on_disk["rows"][0]["fd_teacher"]
    teacher, few, *students = on_disk["rows"]
    assert teacher["psnr"] is None and report["rows"][0]["psnr"] == float("inf")  # the reference (null on disk)
    for row in on_disk["rows"]:
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["fd_real"] >= 0.0 and row["fd_teacher"] >= 0.0
        assert np.isfinite(row["diversity"]) and row["diversity"] > 0.0
        assert np.isfinite(row["ms_per_sample"]) and row["ms_per_sample"] > 0.0
    for row in [few, *students]:
        assert np.isfinite(row["psnr"]) and 5.0 < row["psnr"] < 100.0
    assert teacher["speedup"] == 1.0
    for row in students:  # 2 network calls against the 4x2-call reference teacher
        assert row["speedup"] > 1.0, row
    assert report["rows"][2]["name"] == "arcflow"


def test_markdown_table(evaluated):
    out, report = evaluated
    text = (out / "report.md").read_text()
    assert text == render_markdown(report)
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 4  # header + four rows
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table[1:]]
    assert [c[0] for c in cells] == [r["name"] for r in report["rows"]]
    assert cells[0][5] == "ref" and cells[0][8] == "1.0x"
    assert all(c[5] != "ref" and float(c[5]) > 0 for c in cells[1:])
    assert all(c[4].endswith("%") and 0 <= float(c[4][:-1]) <= 100 for c in cells)
    assert f"{NUM_SAMPLES} held-out noise seeds" in text


def test_grid_layout(evaluated):
    out, report = evaluated
    columns = report["config"]["grid_columns"]
    rows = 2 + len(report["config"]["adapters"])
    width, height = Image.open(out / "grid.png").size
    cell, pad = 8 * 8 + 2, 2  # 8x8 digits upscaled to 64 px, 2 px padding
    margin = width - (pad + columns * cell)  # the row labels' column
    assert height == pad + rows * cell and margin > 40
    labels = np.asarray(Image.open(out / "grid.png"))[:, :margin]
    for row in range(rows):  # each row's label is drawn (light on grey) beside it
        assert (labels[pad + row * cell : pad + row * cell + 64] > 200).any(), row


def grid_cells(path, row, columns):
    """Images of one grid row back as uint8 [columns, 8, 8] (one pixel per 8x8 upscaled block)."""
    grid = np.asarray(Image.open(path))
    y, x0 = 2 + row * 66, grid.shape[1] - columns * 66  # after the row-label margin
    return np.stack([grid[y : y + 64 : 8, x0 + c * 66 : x0 + c * 66 + 64 : 8] for c in range(columns)])


def test_metrics_match_an_independent_recomputation(evaluated, runs):
    """PSNR pairs each image with the teacher's from the SAME held-out noise and prompt; accuracy
    checks the prompted digit; the grid's columns share their noise."""
    from arcflow.distill.runs import load_run
    from arcflow.pipeline.classifier import load_digits_classifier
    from arcflow.pipeline.recording import sample_teacher

    out, report = evaluated
    loaded = load_run(runs[0])
    teacher = loaded.teacher
    prompts = teacher.prompt_set()
    batch = [prompts[i % len(prompts)] for i in range(NUM_SAMPLES)]
    labels = torch.tensor([i % len(prompts) for i in range(NUM_SAMPLES)])
    seeds = heldout_seeds(NUM_SAMPLES, 0)
    with torch.no_grad():
        reference = teacher.decode(sample_teacher(teacher, batch, seeds, TEACHER_STEPS))
        few = teacher.decode(sample_teacher(teacher, batch, seeds, 2))
        student = teacher.decode(loaded.sample_latents(batch, seeds))

    def psnr(images):
        mse = ((images - reference) ** 2).flatten(1).mean(1).double()
        return float((10 * torch.log10(1 / mse)).mean())

    rows = report["rows"]
    assert rows[1]["psnr"] == pytest.approx(psnr(few), abs=1e-3)
    assert rows[2]["psnr"] == pytest.approx(psnr(student), abs=1e-3)
    accuracy = float((load_digits_classifier().predict(student) == labels).float().mean())
    assert rows[2]["accuracy"] == pytest.approx(accuracy)
    columns = report["config"]["grid_columns"]
    to_u8 = lambda x: (x[:columns, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()  # noqa: E731
    assert np.abs(grid_cells(out / "grid.png", 0, columns).astype(int) - to_u8(reference)).max() <= 1
    assert np.abs(grid_cells(out / "grid.png", 2, columns).astype(int) - to_u8(student)).max() <= 1


def test_heldout_seeds_never_used_by_the_builder():
    from arcflow.pipeline.plan import sample_seed

    held = heldout_seeds(1000)
    assert len(set(held)) == 1000
    assert held == heldout_seeds(1000)  # deterministic
    assert all(0 <= s < 2**63 for s in held)
    assert not set(held) & set(heldout_seeds(1000, seed=1))  # "other noise" for the FD vs teacher
    builder = {sample_seed(job, i) for job in range(4) for i in range(10000)}
    assert not builder & set(held)


# --- metrics ------------------------------------------------------------------------------------


def test_frechet_identical_sets_is_zero():
    a = np.random.default_rng(0).normal(size=(500, 6))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(torch.from_numpy(a).float(), torch.from_numpy(a).float()) == pytest.approx(0.0, abs=1e-4)


def test_frechet_mean_shift_is_squared_distance():
    """Identity-covariance Gaussians d apart: FD = d^2 (closed form), within sampling error."""
    rng = np.random.default_rng(1)
    dim, n, d = 4, 200_000, 3.0
    shift = np.zeros(dim)
    shift[0] = d
    a, b = rng.normal(size=(n, dim)), rng.normal(size=(n, dim)) + shift
    assert frechet_distance(a, b) == pytest.approx(d**2, abs=0.05)
    # scale 1 vs 2 (identity vs 4 I): sum of (sqrt(1) - sqrt(4))^2 = dim
    assert frechet_distance(a, 2.0 * rng.normal(size=(n, dim))) == pytest.approx(dim, abs=0.05)


def test_frechet_matches_scipy_closed_form():
    """Correlated covariances: the eigen-decomposition form equals tr(Ca + Cb - 2 sqrtm(Ca Cb))."""
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(2)
    a = rng.normal(size=(3000, 5)) @ rng.normal(size=(5, 5))
    b = rng.normal(size=(2000, 5)) @ rng.normal(size=(5, 5)) + rng.normal(size=5)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * sqrtm(ca @ cb).real)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError):
        frechet_distance(a[:1], b)


def test_psnr_and_diversity():
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.8
    same = _psnr(x, x)
    assert np.isfinite(same) and same >= 100.0  # identical images: capped, not inf or nan
    assert _psnr(x + 0.1, x) == pytest.approx(20.0, abs=1e-3)  # MSE 0.01
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    assert _diversity(x[[0, 0, 0, 3, 3, 3]], labels) == 0.0
    pair = torch.stack([torch.zeros(1, 8, 8), torch.ones(1, 8, 8)])
    assert _diversity(pair, torch.tensor([5, 5])) == pytest.approx(8.0)  # L2 distance of 64 unit pixels


# --- the command line ---------------------------------------------------------------------------


def test_cli_not_a_run_is_one_line(tmp_path):
    """A real subprocess: what a user sees on the console."""
    out = tmp_path / "X"
    res = subprocess.run([sys.executable, "-m", "arcflow.cli", "evaluate", "--adapter", str(tmp_path / "NOT_A_RUN"),
                          "--out", str(out)], capture_output=True, text=True, timeout=120, env=ENV)
    assert_one_line_error(res.returncode, res.stderr, "NOT_A_RUN")
    assert not out.exists()


@pytest.mark.parametrize("args,needle", [
    (("--num-samples", "5"), "--num-samples"),
    (("--teacher-steps", "0"), "--teacher-steps"),
    (("--speed-repeats", "0"), "--speed-repeats"),
])
def test_cli_bad_numbers_are_one_line(runs, tmp_path, capsys, args, needle):
    out = tmp_path / "out"
    code, _, err = cli(capsys, "evaluate", "--adapter", runs[0], "--out", out, *args)
    assert_one_line_error(code, err, needle)
    assert not out.exists()


def test_cli_bad_runs_and_out_are_one_line(runs, tmp_path, capsys):
    a_file = tmp_path / "taken"
    a_file.write_text("not a directory")
    code, _, err = cli(capsys, "evaluate", "--adapter", runs[0], "--out", a_file)
    assert_one_line_error(code, err, "--out")
    other = tmp_path / "flux-run"
    shutil.copytree(runs[0], other)
    record = json.loads((other / "arcflow_config.json").read_text())
    record["teacher"]["id"] = "black-forest-labs/FLUX.1-dev"
    (other / "arcflow_config.json").write_text(json.dumps(record))
    code, _, err = cli(capsys, "evaluate", "--adapter", other, "--out", tmp_path / "o2")
    assert_one_line_error(code, err, "FLUX.1-dev")
    (other / "arcflow_config.json").write_text("{not json")
    code, _, err = cli(capsys, "evaluate", "--adapter", other, "--out", tmp_path / "o3")
    assert_one_line_error(code, err)
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_cli_writes_and_prints_the_report(runs, tmp_path, capsys):
    out = tmp_path / "rep"
    code, stdout, err = cli(capsys, "evaluate", "--adapter", f"{runs[1]}/", "--out", out, "--num-samples", "20",
                            "--teacher-steps", "2", "--speed-batch", "4", "--speed-repeats", "1", "--no-progress")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["teacher 2x2", "teacher 2-step Euler", "k1"]  # trailing slash
    assert report["config"]["speed_repeats"] == 1
    assert (out / "report.md").read_text().rstrip() in stdout
    assert "grid:" in stdout and "teacher 2x2, teacher 2-step Euler, k1" in stdout
    width, height = Image.open(out / "grid.png").size
    assert height == 2 + 3 * 66 and width > 2 + 10 * 66  # three rows, labelled
