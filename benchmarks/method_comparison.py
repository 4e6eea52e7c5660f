"""Offline vs on-policy distillation, measured side by side at equal teacher cost (digits teacher).

    .venv/bin/python benchmarks/method_comparison.py            # ~25 min on 2 shared CPU cores
    .venv/bin/python benchmarks/method_comparison.py --quick    # smoke test: every row, tiny sizes

Two regimes, each with its own teacher guidance and held-out evaluation:

* ``rank4-g1.5``: the paper's adapter budget (LoRA rank 4: ~4.5% of the digits transformer) at the
  teacher's default guidance 1.5;
* ``rank4-g4.0``: the same budget on a curved teacher (guidance 4.0).

Rows, each trained with 2 seeds: three students (K=1 linear; K constant velocities, momentum off;
ArcFlow K with momentum) x four methods, all at the SAME teacher network evaluations E:

* ``offline``: today's defaults (K=8, one weight group, lr 1e-3, EMA 0.99, ...) on a dataset of
  E / (50 steps x 2) trajectories;
* ``offline-official``: the same dataset and steps with the official recipe adapted to digits
  (``--preset official``: K=16, 4 weight groups, 0.5 x MSE x 30, betas (0.9, 0.95), Karras EMA, ...);
* ``on-policy``: the official procedure from prompts alone (``--on-policy --preset official``),
  iterations x batch x NFE x states x 2 = E;
* ``polish``: ``offline-official`` on half the dataset, then ``--on-policy --from`` for half the
  iterations (E/2 + E/2).

Scores: PSNR and Frechet distance vs the teacher's 50x2 sample on held-out noise (`arcflow evaluate`),
the convergence curve (seed 0 exported at 1/3, 2/3 and all of its steps; resume is exact), the
teacher evaluations each row spent, and wall time (dataset generation included for offline rows).
Writes benchmarks/results/method_comparison.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results"
STEPS = 50
REGIMES = {"rank4-g1.5": 1.5, "rank4-g4.0": 4.0}
RANK = 4
STUDENTS = {
    "K=1 linear": {"k": 1, "momentum": False},
    "K constant": {"momentum": False},
    "ArcFlow K": {"momentum": True},
}
METHODS = ("offline", "offline-official", "on-policy", "polish")
#: K of today's defaults vs the official recipe (the "K" of the constant and ArcFlow rows).
K_TODAY, K_OFFICIAL = 8, 16


def sizes(quick: bool) -> dict[str, int]:
    if quick:
        return dict(on_iters=2, on_batch=2, off_iters=2, off_batch=8, eval_samples=20, seeds=1, shard=4)
    # E = 150 x 16 x 16 = 38,400 teacher evaluations per row = 384 trajectories (12 shards of 32); a
    # polish: 6 shards + 75 on-policy iterations. About 25 minutes on 2 shared CPU cores.
    return dict(on_iters=150, on_batch=16, off_iters=200, off_batch=64, eval_samples=200, seeds=2, shard=32)


def make_dataset(out: Path, samples: int, shard: int, guidance: float) -> float:
    """A committed digits dataset (float32 storage), generated in this process; returns seconds."""
    from arcflow.pipeline.generate import dataset_spec
    from arcflow.pipeline.generation_config import GenerationConfig
    from arcflow.pipeline.plan import plan_shards
    from arcflow.pipeline.registry import load_teacher
    from arcflow.pipeline.shard_worker import commit_shard, describe_teacher, record_shard
    from arcflow.storage.writer import create_or_open_dataset

    start = time.perf_counter()
    teacher = load_teacher("digits")
    config = GenerationConfig(out=str(out), num_samples=samples, steps=STEPS, shard_size=shard, seed=0,
                              dtype="float32", batch_size=64)
    info = describe_teacher(teacher, None, STEPS)
    spec = dataset_spec(config, info, guidance)
    create_or_open_dataset(str(out), spec)
    for plan in plan_shards(samples, shard, info["prompts"], 0):
        commit_shard(str(out), spec, plan, record_shard(teacher, spec, plan, config.batch_size))
    return time.perf_counter() - start


def settings_for(job: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The ``build_config`` settings and preset of one training job."""
    student = dict(STUDENTS[job["student"]])
    official = job["method"] != "offline"
    if "k" not in student:
        student["k"] = K_OFFICIAL if official else K_TODAY
    common = {"out": job["out"], "seed": job["seed"], "lora_rank": RANK, "progress": False, "threads": 1,
              "log_every": 10, "checkpoint_every": 10**6, **student}
    if job["kind"] == "offline":
        common.update(dataset=job["dataset"], iters=job["iters"], batch_size=job["batch"], shards=job.get("shards"))
        return common, ("official" if official else None)
    common.update(on_policy=True, iters=job["iters"], batch_size=job["batch"],
                  teacher_mix_iters=max(1, job["iters"] // 5))  # the official 2,000 of 10,000: the first 20%
    if job.get("from_run"):
        common["from_run"] = job["from_run"]
        for key in ("k", "momentum", "lora_rank"):  # the run's student
            common.pop(key)
    else:
        common.update(teacher="digits", guidance=job["guidance"])
    return common, "official"


def train_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train one run in this process (the Ray Train worker's loop), exporting at ``job['stages']``."""
    import torch

    from arcflow.distill.on_policy import resolve
    from arcflow.distill.presets import build_config
    from arcflow.distill.run_plan import DISTILL_CONFIG_FILE, plan_run
    from arcflow.distill.worker import train_worker

    torch.set_num_threads(1)
    settings, preset = settings_for(job)
    out = Path(job["out"])
    shutil.rmtree(out, ignore_errors=True)
    config = resolve(build_config(settings, preset))
    snapshots, start = [], time.perf_counter()
    for stage in job["stages"]:
        staged = replace(config, iters=stage, resume=stage != job["stages"][0])
        plan = plan_run(staged)
        out.mkdir(parents=True, exist_ok=True)
        (out / DISTILL_CONFIG_FILE).write_text(json.dumps(staged.to_dict(), indent=2))
        train_worker(staged, plan)
        if stage != job["stages"][-1]:
            snap = out.parent / f"{out.name}@{stage}"
            shutil.rmtree(snap, ignore_errors=True)
            shutil.copytree(out, snap, ignore=shutil.ignore_patterns("checkpoints"))
            snapshots.append((stage, str(snap)))
    snapshots.append((job["stages"][-1], str(out)))
    record = json.loads((out / "arcflow_config.json").read_text())
    return {"key": job["key"], "seconds": time.perf_counter() - start, "snapshots": snapshots,
            "teacher_evals": record["teacher_evals"], "teacher_evals_own": record["teacher_evals_own"]}


def stages_of(iters: int, curve: bool) -> list[int]:
    return sorted({max(1, iters // 3), max(1, 2 * iters // 3), iters}) if curve else [iters]


def run_regime(name: str, guidance: float, size: dict[str, int], work: Path, jobs: int) -> dict[str, Any]:
    from arcflow.distill.evaluate import EvaluationConfig, evaluate
    from arcflow.storage.reader import open_dataset

    budget = size["on_iters"] * size["on_batch"] * 2 * 4 * 2  # NFE 2, 4 states, true CFG
    samples = max(budget // (STEPS * 2), 2 * size["shard"])  # (only --quick is below two shards)
    work.mkdir(parents=True, exist_ok=True)
    dataset = work / "dataset"
    shutil.rmtree(dataset, ignore_errors=True)
    gen_seconds = make_dataset(dataset, samples, size["shard"], guidance)
    shards = sorted(open_dataset(str(dataset)).committed_shards())
    half = shards[: max(1, len(shards) // 2)]
    seeds = list(range(size["seeds"]))

    def job(student, method, seed, kind, **extra):
        key = f"{student}|{method}|s{seed}" + ("|base" if extra.pop("base", False) else "")
        out = work / key.replace("|", "_").replace(" ", "").replace("=", "")
        return dict(key=key, student=student, method=method, seed=seed, kind=kind, out=str(out), guidance=guidance, **extra)

    first, second = [], []
    for student in STUDENTS:
        for seed in seeds:
            curve = seed == 0
            for method in ("offline", "offline-official"):
                first.append(job(student, method, seed, "offline", dataset=str(dataset), iters=size["off_iters"],
                                 batch=size["off_batch"], stages=stages_of(size["off_iters"], curve)))
            first.append(job(student, "on-policy", seed, "on-policy", iters=size["on_iters"], batch=size["on_batch"],
                             stages=stages_of(size["on_iters"], curve)))
            first.append(job(student, "polish", seed, "offline", dataset=str(dataset), shards=half, base=True,
                             iters=size["off_iters"], batch=size["off_batch"], stages=[size["off_iters"]]))
    results = _run_all(first, jobs)
    for student in STUDENTS:
        for seed in seeds:
            base = next(j for j in first if j["student"] == student and j["seed"] == seed and j["key"].endswith("|base"))
            polish_iters = max(1, size["on_iters"] // 2)
            second.append(job(student, "polish", seed, "on-policy", from_run=base["out"], iters=polish_iters,
                              batch=size["on_batch"], stages=stages_of(polish_iters, seed == 0)))
    results.update(_run_all(second, jobs))

    final = {k: r["snapshots"][-1][1] for k, r in results.items() if not k.endswith("|base")}
    curve_dirs = [p for r in results.values() for _, p in r["snapshots"][:-1]]
    report = evaluate(EvaluationConfig(adapters=list(final.values()) + curve_dirs, out=str(work / "report"),
                                       num_samples=size["eval_samples"], guidance=guidance, speed_repeats=1,
                                       speed_batch=50, overwrite=True), progress=False)
    scored = {row["extra"]["run"]: row for row in report["rows"] if row.get("extra")}
    rows = []
    for student in STUDENTS:
        for method in METHODS:
            runs = []
            for seed in seeds:
                key = f"{student}|{method}|s{seed}"
                r = results[key]
                metrics = scored[final[key]]
                seconds = r["seconds"] + gen_seconds
                if method == "polish":
                    seconds = r["seconds"] + results[key + "|base"]["seconds"] + gen_seconds * len(half) / len(shards)
                elif method == "on-policy":
                    seconds = r["seconds"]
                runs.append({"seed": seed, "psnr": metrics["psnr"], "fd_teacher": metrics["fd_teacher"],
                             "fd_real": metrics["fd_real"], "accuracy": metrics["accuracy"],
                             "teacher_evals": r["teacher_evals"], "wall_seconds": seconds,
                             "curve": [(step, scored[p]["psnr"]) for step, p in r["snapshots"]] if seed == 0 else None})
            rows.append({"regime": name, "student": student, "method": method, "runs": runs})
    teacher_rows = [r for r in report["rows"] if not r.get("extra")]
    return {"regime": name, "guidance": guidance, "teacher_evals_budget": budget, "dataset_samples": samples,
            "dataset_seconds": gen_seconds, "rows": rows, "teacher_rows": teacher_rows,
            "seed_to_seed_floor": report["seed_to_seed_floor"]}


def _run_all(jobs_list: list[dict[str, Any]], jobs: int) -> dict[str, dict[str, Any]]:
    out = {}
    if jobs <= 1:
        for job in jobs_list:
            out[job["key"]] = train_job(job)
            print(f"  trained {job['key']} in {out[job['key']]['seconds']:.0f}s", flush=True)
        return out
    import multiprocessing

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for job, result in zip(jobs_list, pool.map(train_job, jobs_list)):
            out[job["key"]] = result
            print(f"  trained {job['key']} in {result['seconds']:.0f}s", flush=True)
    return out


def _cell(values: list[float], fmt: str) -> str:
    values = np.asarray(values, dtype=float)
    if len(values) == 1:
        return fmt.format(values[0])
    return (fmt + " ± " + fmt).format(values.mean(), (values.max() - values.min()) / 2)


def render(result: dict[str, Any]) -> str:
    size = result["sizes"]
    lines = [
        f"Digits teacher, LoRA rank {RANK}, NFE 2; every row at the same teacher cost per regime "
        f"(on-policy: {size['on_iters']} iterations x batch {size['on_batch']}; offline: that many evaluations as a "
        f"dataset, {size['off_iters']} steps x batch {size['off_batch']}); {size['seeds']} seed(s), mean ± half-range; "
        f"scored on {size['eval_samples']} held-out noises. K = {K_TODAY} with today's settings, {K_OFFICIAL} with the "
        f"official recipe. Convergence: PSNR (dB, seed 0) at 1/3, 2/3 and all of the run's steps.",
        "",
        "| regime | student | method | PSNR vs teacher (dB) | FD vs teacher | teacher evals | wall (s) | convergence |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for regime in result["regimes"]:
        for row in regime["rows"]:
            runs = row["runs"]
            curve = " → ".join(f"{p:.2f}" for _, p in runs[0]["curve"]) if runs[0]["curve"] else ""
            lines.append(
                f"| {regime['regime']} | {row['student']} | {row['method']} | {_cell([r['psnr'] for r in runs], '{:.2f}')} | "
                f"{_cell([r['fd_teacher'] for r in runs], '{:.2f}')} | {runs[0]['teacher_evals']:,} | "
                f"{np.mean([r['wall_seconds'] for r in runs]):.0f} | {curve} |"
            )
    lines.append("")
    for regime in result["regimes"]:
        refs = ", ".join(f"{r['name']} {r['psnr']:.2f} dB / FD {r['fd_teacher']:.2f}" for r in regime["teacher_rows"][1:])
        best = max(regime["rows"], key=lambda r: np.mean([x["psnr"] for x in r["runs"]]))
        lines.append(f"{regime['regime']} (guidance {regime['guidance']:g}): {regime['dataset_samples']} trajectories = "
                     f"{regime['teacher_evals_budget']:,} teacher evaluations per row; reference: {refs}; teacher "
                     f"seed-to-seed FD floor {regime['seed_to_seed_floor']:.2f}. Best PSNR: {best['student']}, {best['method']}.")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = result["regimes"]
    fig, axes = plt.subplots(1, len(regimes), figsize=(5.5 * len(regimes), 4), squeeze=False)
    styles = {"offline": "-", "offline-official": "--", "on-policy": "-.", "polish": ":"}
    colors = {"K=1 linear": "tab:gray", "K constant": "tab:blue", "ArcFlow K": "tab:red"}
    for ax, regime in zip(axes[0], regimes):
        for row in regime["rows"]:
            curve = row["runs"][0]["curve"]
            last = curve[-1][0]
            ax.plot([s / last for s, _ in curve], [p for _, p in curve], styles[row["method"]], marker="o",
                    color=colors[row["student"]], label=f"{row['student']}, {row['method']}")
        ax.set_title(f"{regime['regime']} (guidance {regime['guidance']:g})")
        ax.set_xlabel("fraction of the run's steps")
        ax.set_ylabel("PSNR vs teacher 50x2 (dB)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="benchmarks/.method_comparison", help="where datasets and runs go")
    parser.add_argument("--results", default=str(RESULTS), help="where the JSON, table and plot go")
    parser.add_argument("--jobs", type=int, default=2, help="training processes at a time")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: every row, minutes -> seconds")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    size = sizes(args.quick)
    started = time.perf_counter()
    regimes = []
    for name, guidance in REGIMES.items():
        print(f"regime {name}", flush=True)
        regimes.append(run_regime(name, guidance, size, Path(args.work) / name, 1 if args.quick else args.jobs))
    result = {"sizes": size, "quick": args.quick, "regimes": regimes, "seconds": time.perf_counter() - started}
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "method_comparison.json").write_text(json.dumps(result, indent=2))
    text = render(result)
    (results / "method_comparison.md").write_text(text)
    plot(result, results / "method_comparison.png")
    print(text)
    print(f"total {result['seconds']:.0f}s")


if __name__ == "__main__":
    main()
