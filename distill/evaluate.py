"""`arcflow evaluate`: the 2-step students against the teacher, in numbers and in a picture.

Rows: the teacher with its full sampler (50 Euler steps with CFG: "50x2"), the teacher with only the
student's NFE as plain Euler steps, and each student. Every row starts from the same held-out noise
(seeds from a domain the trajectory builder never uses) and the same prompts, so PSNR against the
teacher compares like with like. Metrics (docs/architecture.md, Measuring):

* ``fd_real``: Frechet distance on the digits classifier's features vs held-out real digits;
* ``fd_teacher``: the same vs teacher 50x2 samples from OTHER noise; on the teacher row this is the
  teacher's own seed-to-seed floor;
* ``accuracy``: the classifier agrees with the prompted digit;
* ``psnr``: vs the teacher 50x2 image from the same noise and prompt (mean over samples of the
  per-sample PSNR, images in [0, 1]);
* ``diversity``: mean pairwise L2 distance between images of the same prompt;
* ``ms_per_sample`` and ``speedup``: wall time on one batch, measured in this process, best of a few
  repeats, the teacher with its full sampler as the reference.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor

from arcflow.core.errors import ArcflowError, check_finite, check_numbers, quote, refuse_overwrite
from arcflow.core.files import atomic_outputs

from .metrics import frechet_distance

log = logging.getLogger(__name__)

#: Seeds for evaluation noise come from their own SeedSequence domain (see heldout_seeds).
EVAL_SEED_DOMAIN = 0xE7A1


def heldout_seeds(count: int, seed: int = 0) -> list[int]:
    """Noise seeds disjoint in construction from the builder's ``sample_seed(job_seed, i)``.

    63-bit, from two 32-bit words combined explicitly (low word first), so the same on every platform.
    """
    out = []
    for i in range(count):
        lo, hi = (int(w) for w in np.random.SeedSequence([EVAL_SEED_DOMAIN, seed, i]).generate_state(2, np.uint32))
        out.append(((hi << 32) | lo) >> 1)
    return out


#: What `arcflow evaluate` writes into ``--out`` (an earlier report is kept unless ``--overwrite``).
REPORT_FILES = ("report.json", "report.md", "grid.png", "evaluate_config.json")


@dataclass
class EvaluationConfig:
    """Configuration of `arcflow evaluate`; written next to the report."""

    adapters: list[str]
    out: str
    num_samples: int = 1000
    teacher: str = "digits"
    teacher_steps: int = 50
    guidance: Optional[float] = None
    seed: int = 0
    speed_batch: int = 100
    speed_repeats: int = 3
    grid_columns: int = 10
    overwrite: bool = False

    def validate(self) -> None:
        check_numbers(self, at_most={"num_samples": 1_000_000, "teacher_steps": 10_000, "speed_batch": 100_000,
                                     "speed_repeats": 1000, "grid_columns": 1000})
        check_finite("--guidance", self.guidance, minimum=0.0)
        refuse_overwrite(self.out, REPORT_FILES, self.overwrite)
        if self.num_samples < 20:
            raise ArcflowError(f"--num-samples must be >= 20 (Frechet distance needs a spread), got {self.num_samples}")
        if self.teacher != "digits":
            raise ArcflowError("evaluate measures on the embedded 'digits' teacher only (its classifier scores the images)")
        for run in self.adapters:
            if not (Path(run) / "arcflow_config.json").is_file():
                raise ArcflowError(f"--adapter {run} is not a student run directory (no arcflow_config.json)")
        if self.teacher_steps < 1 or self.speed_batch < 1 or self.speed_repeats < 1 or self.grid_columns < 1:
            raise ArcflowError("--teacher-steps, --speed-batch, --speed-repeats and grid_columns must be >= 1")


@dataclass
class Row:
    name: str
    nfe: int
    fd_real: float
    fd_teacher: float
    accuracy: float
    psnr: float
    diversity: float
    ms_per_sample: float
    speedup: float
    extra: dict[str, Any] = field(default_factory=dict)


def _row_names(runs: list[str]) -> list[str]:
    """Row names for student runs: the directory name (also for ``.`` or a trailing slash), or the
    path as given where two runs share a directory name."""
    names = [Path(run).resolve().name or str(run) for run in runs]
    return [str(run) if names.count(name) > 1 else name for run, name in zip(runs, names)]


def _psnr(images: Tensor, reference: Tensor) -> float:
    mse = ((images - reference) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return float((10 * torch.log10(1.0 / mse)).mean())


def _diversity(images: Tensor, labels: Tensor) -> float:
    scores = []
    for digit in labels.unique():
        group = images[labels == digit].flatten(1).double()
        if group.shape[0] > 1:
            d = torch.cdist(group, group)
            n = group.shape[0]
            scores.append(float(d.sum() / (n * (n - 1))))
    return float(np.mean(scores))


def _best_time(fn: Callable[[], Any], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def evaluate(config: EvaluationConfig, progress: bool = True) -> dict[str, Any]:
    """Run the evaluation and write ``report.json``, ``report.md`` and ``grid.png`` under ``out``."""
    from tqdm.auto import tqdm

    from arcflow.pipeline.classifier import load_digits_classifier
    from arcflow.pipeline.digits_data import digits_split
    from arcflow.pipeline.images import save_grid
    from arcflow.pipeline.recording import sample_teacher
    from arcflow.pipeline.registry import load_teacher

    from .runs import load_run
    from .student import read_student_config

    config.validate()
    records = [read_student_config(run) for run in config.adapters]
    for run, record in zip(config.adapters, records):
        saved = record.get("teacher")
        teacher_id = saved.get("id") if isinstance(saved, dict) else None
        if teacher_id != config.teacher:
            raise ArcflowError(f"--adapter {run} was distilled from teacher {quote(teacher_id)}, not {quote(config.teacher)}")
    names = _row_names(config.adapters)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = load_teacher(config.teacher)
    classifier = load_digits_classifier()
    guidance = config.guidance if config.guidance is not None else teacher.default_guidance
    prompts_all = teacher.prompt_set()
    n = config.num_samples
    prompts = [prompts_all[i % len(prompts_all)] for i in range(n)]
    labels = torch.tensor([i % len(prompts_all) for i in range(n)])
    seeds = heldout_seeds(n, config.seed)
    other_seeds = heldout_seeds(n, config.seed + 1)
    nfes = sorted({int(r.get("nfe", r.get("student", {}).get("nfe", 2))) for r in records} or {2})

    real = digits_split().heldout_images.float()
    real_feats = classifier.features(real)

    def score(name: str, nfe: int, images: Tensor, teacher_images: Tensor, teacher_feats_other: Tensor) -> Row:
        feats = classifier.features(images)
        return Row(
            name=name,
            nfe=nfe,
            fd_real=frechet_distance(feats, real_feats),
            fd_teacher=frechet_distance(feats, teacher_feats_other),
            accuracy=float((classifier.predict(images) == labels).float().mean()),
            psnr=_psnr(images, teacher_images) if images is not teacher_images else float("inf"),
            diversity=_diversity(images, labels),
            ms_per_sample=float("nan"),
            speedup=float("nan"),
        )

    bar = tqdm(total=2 + len(nfes) + len(config.adapters), desc="evaluate", unit="row", disable=None if progress else True)
    with torch.inference_mode():
        teacher_img = teacher.decode(sample_teacher(teacher, prompts, seeds, config.teacher_steps, guidance))
        bar.update(1)
        other_img = teacher.decode(sample_teacher(teacher, prompts, other_seeds, config.teacher_steps, guidance))
        bar.update(1)
    other_feats = classifier.features(other_img)
    rows = [score(f"teacher {config.teacher_steps}x{2 if teacher.true_cfg and guidance != 1 else 1}",
                  config.teacher_steps * (2 if teacher.true_cfg and guidance != 1 else 1),
                  teacher_img, teacher_img, other_feats)]
    grid_rows = [teacher_img[: config.grid_columns]]
    for nfe in nfes:
        with torch.inference_mode():
            few = teacher.decode(sample_teacher(teacher, prompts, seeds, nfe, guidance))
        rows.append(score(f"teacher {nfe}-step Euler", nfe * 2 if teacher.true_cfg and guidance != 1 else nfe, few, teacher_img, other_feats))
        grid_rows.append(few[: config.grid_columns])
        bar.update(1)
    students = []
    for run, name in zip(config.adapters, names):
        loaded = load_run(run)
        student, nfe = loaded.student, loaded.nfe
        with torch.inference_mode():
            images = torch.cat([
                teacher.decode(loaded.sample_latents(prompts[lo : lo + 500], seeds[lo : lo + 500]))
                for lo in range(0, n, 500)
            ])
        row = score(name, nfe, images, teacher_img, other_feats)
        row.extra = {"run": str(run), "k": student.config.k, "momentum": student.config.momentum,
                     "trainable": student.config.trainable}
        rows.append(row)
        students.append((row, loaded, nfe))
        grid_rows.append(images[: config.grid_columns])
        bar.update(1)
    bar.close()

    _measure_speed(config, teacher, guidance, prompts, seeds, rows, students, nfes)
    report = {
        "config": asdict(config),
        "guidance": guidance,
        "teacher_revision": teacher.revision,
        "seed_to_seed_floor": rows[0].fd_teacher,
        "rows": [asdict(r) for r in rows],
        "grid_rows": [r.name for r in rows],
    }
    # all four or none: a report cut short by a full disk must not block the rerun ("already holds")
    with atomic_outputs([out / name for name in REPORT_FILES]) as temps:
        files = dict(zip(REPORT_FILES, temps))
        save_grid(torch.cat(grid_rows), files["grid.png"], nrow=config.grid_columns,
                  row_labels=[r.name for r in rows])
        files["report.json"].write_text(json.dumps(_strict_json(report), indent=2, allow_nan=False))
        files["report.md"].write_text(render_markdown(report))
        files["evaluate_config.json"].write_text(json.dumps(asdict(config), indent=2))
    return report


def _measure_speed(config, teacher, guidance, prompts, seeds, rows, students, nfes) -> None:
    """Wall time per sample on one batch, all rows in this process; teacher 50x2 is the reference."""
    from arcflow.pipeline.recording import sample_teacher

    batch = min(config.speed_batch, len(prompts))
    p, s = prompts[:batch], seeds[:batch]
    with torch.no_grad():
        t_teacher = _best_time(lambda: sample_teacher(teacher, p, s, config.teacher_steps, guidance, micro_batch=None), config.speed_repeats)
        timings = {0: t_teacher}
        for i, nfe in enumerate(nfes, start=1):
            timings[i] = _best_time(lambda: sample_teacher(teacher, p, s, nfe, guidance, micro_batch=None), config.speed_repeats)
        for j, (row, loaded, nfe) in enumerate(students):
            timings[1 + len(nfes) + j] = _best_time(lambda: loaded.sample_latents(p, s), config.speed_repeats)
    for i, row in enumerate(rows):
        row.ms_per_sample = 1000 * timings[i] / batch
        row.speedup = t_teacher / timings[i]


def _strict_json(value: Any) -> Any:
    """``value`` with every non-finite float as null (the teacher's PSNR against itself is infinite):
    strict JSON that any parser reads."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value


def render_markdown(report: dict[str, Any]) -> str:
    """The report table (generated; the README embeds this file's content)."""
    lines = [
        f"Evaluation on {report['config']['num_samples']} held-out noise seeds, guidance {report['guidance']:g}; "
        f"teacher seed-to-seed Frechet floor {report['seed_to_seed_floor']:.3f}.",
        "",
        "| sampler | NFE | FD vs real | FD vs teacher | accuracy | PSNR vs teacher (dB) | diversity | ms/sample | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        psnr = "ref" if r["psnr"] == float("inf") else f"{r['psnr']:.2f}"
        lines.append(
            f"| {r['name']} | {r['nfe']} | {r['fd_real']:.3f} | {r['fd_teacher']:.3f} | {100 * r['accuracy']:.1f}% | "
            f"{psnr} | {r['diversity']:.3f} | {r['ms_per_sample']:.3f} | {r['speedup']:.1f}x |"
        )
    return "\n".join(lines) + "\n"
