"""Ablation of the offline distiller on the embedded digits teacher.

    .venv/bin/python benchmarks/ablation.py --dataset demo/trajectories --iters 1000   # ~40 min, 2 CPU cores

Trains students from ONE trajectory dataset with the same steps, batch and learning rate, then
scores them all in one `arcflow evaluate` pass on held-out noise (PSNR vs the teacher's 50x2 sample
from the same noise, Frechet distances, accuracy):

* the core comparison, 2 seeds each: K=1 (linear shortcut), ArcFlow K=8, and the no-momentum
  control (K=8 constant velocities), all with the default LoRA + heads recipe;
* the number of components: ArcFlow K=4 and K=16 (seed 0);
* the trainable set: heads only and full fine-tuning (lr 3e-4) for K=1 and K=8 (seed 0);
* the data size: K=1 and K=8 on the first shards only (``--small-samples``, default 2000);
* convergence: K=1 and K=8 (seed 0) exported at fixed iteration checkpoints (continued with
  `--resume`, which is exact), to test the "4x faster convergence" claim.

Writes benchmarks/results/ablation.json (every run), ablation.md (tables generated from the JSON)
and ablation.png (convergence curves). ``--quick`` runs a much smaller version for smoke tests.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


def variants(iters: int, small_shards: list[int]) -> list[dict]:
    core = [
        {"name": "k1", "k": 1},
        {"name": "arcflow-k8", "k": 8, "momentum": True},
        {"name": "nomom-k8", "k": 8, "momentum": False},
        # (k1: K=1 has no momentum component either way)
    ]
    runs = [dict(v, seed=s, group="core") for v in core for s in (0, 1)]
    runs += [
        {"name": "arcflow-k4", "k": 4, "momentum": True, "seed": 0, "group": "components"},
        {"name": "arcflow-k16", "k": 16, "momentum": True, "seed": 0, "group": "components"},
        {"name": "k1-heads", "k": 1, "trainable": "heads", "seed": 0, "group": "trainable"},
        {"name": "arcflow-k8-heads", "k": 8, "momentum": True, "trainable": "heads", "seed": 0, "group": "trainable"},
        {"name": "k1-full", "k": 1, "trainable": "full", "lr": 3e-4, "seed": 0, "group": "trainable"},
        {"name": "arcflow-k8-full", "k": 8, "momentum": True, "trainable": "full", "lr": 3e-4, "seed": 0, "group": "trainable"},
        {"name": "k1-small", "k": 1, "shards": small_shards, "seed": 0, "group": "data"},
        {"name": "arcflow-k8-small", "k": 8, "momentum": True, "shards": small_shards, "seed": 0, "group": "data"},
    ]
    return runs


def train(dataset: str, out: Path, spec: dict, iters: int, batch: int, stages: list[int]) -> list[tuple[int, Path]]:
    """Train one variant in this process (the Ray Train worker's own loop); export at ``stages``."""
    from arcflow.distill.config import DistillConfig
    from arcflow.distill.run_plan import DISTILL_CONFIG_FILE, plan_run
    from arcflow.distill.worker import train_worker

    fields = {k: v for k, v in spec.items() if k not in ("name", "group")}
    config = DistillConfig.from_dict(dict(dataset=dataset, out=str(out), iters=iters, batch_size=batch, checkpoint_every=iters,
                           progress=False, **fields))
    snapshots = []
    for stage in stages:
        staged = replace(config, iters=stage, resume=stage != stages[0])
        plan = plan_run(staged)
        out.mkdir(parents=True, exist_ok=True)
        (out / DISTILL_CONFIG_FILE).write_text(json.dumps(staged.to_dict(), indent=2))
        train_worker(staged, plan)
        if stage != iters:
            snap = out.parent / f"{out.name}@{stage}"
            shutil.rmtree(snap, ignore_errors=True)
            snap.mkdir()
            for name in ("arcflow_config.json", "pytorch_lora_weights.safetensors", "momentum_head.safetensors",
                         "trainable_weights.safetensors"):
                if (out / name).is_file():
                    shutil.copy2(out / name, snap / name)
            snapshots.append((stage, snap))
    snapshots.append((iters, out))
    return snapshots


def summarize(rows: dict[str, dict], runs: list[dict], curves: dict[str, list], iters: int) -> str:
    by_name: dict[str, list[dict]] = {}
    for spec in runs:
        by_name.setdefault(spec["name"], []).append(rows[f"{spec['name']}-s{spec['seed']}"])
    def cell(values, fmt):
        values = np.asarray(values, dtype=float)
        if len(values) == 1:
            return fmt.format(values[0])
        return (fmt + " ± " + fmt).format(values.mean(), (values.max() - values.min()) / 2)
    lines = [
        f"Students trained {iters} steps each from one dataset; scored on held-out noise "
        f"(mean ± half-range over seeds where 2 seeds ran).",
        "",
        "| student | group | seeds | PSNR vs teacher (dB) | FD vs teacher | FD vs real | accuracy |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, group_rows in by_name.items():
        group = next(s["group"] for s in runs if s["name"] == name)
        lines.append(
            f"| {name} | {group} | {len(group_rows)} | {cell([r['psnr'] for r in group_rows], '{:.2f}')} | "
            f"{cell([r['fd_teacher'] for r in group_rows], '{:.2f}')} | {cell([r['fd_real'] for r in group_rows], '{:.2f}')} | "
            f"{cell([100 * r['accuracy'] for r in group_rows], '{:.1f}')}% |"
        )
    lines += ["", "Convergence (PSNR vs teacher, dB, seed 0):", "",
              "| student | " + " | ".join(str(s) for s, _ in next(iter(curves.values()))) + " |",
              "|---|" + "---:|" * len(next(iter(curves.values())))]
    for name, points in curves.items():
        lines.append(f"| {name} | " + " | ".join(f"{p:.2f}" for _, p in points) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="demo/trajectories", help="a digits trajectory dataset (the demo's)")
    parser.add_argument("--work", default="benchmarks/.ablation", help="where the runs go")
    parser.add_argument("--iters", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--eval-samples", type=int, default=1000)
    parser.add_argument("--small-samples", type=int, default=2000, help="samples in the small-data variants")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is robust on a shared 2-core box)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke-test sizes")
    args = parser.parse_args()
    if args.quick:
        args.iters, args.eval_samples = 20, 40

    import torch

    from arcflow.distill.evaluate import EvaluationConfig, evaluate
    from arcflow.storage.reader import open_dataset

    torch.set_num_threads(args.threads)
    reader = open_dataset(args.dataset)
    committed = sorted(reader.committed_shards())
    sizes = reader.shard_sizes(committed)
    small, total = [], 0
    for shard in committed:
        if total >= args.small_samples:
            break
        small.append(shard)
        total += sizes[shard]
    runs = variants(args.iters, small)
    stages = sorted({max(1, args.iters // 6), max(1, args.iters // 3), max(1, 2 * args.iters // 3), args.iters})
    work = Path(args.work)
    adapters, timing, curve_dirs = {}, {}, {}
    started = time.perf_counter()
    for spec in runs:
        key = f"{spec['name']}-s{spec['seed']}"
        out = work / key
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        staged = stages if spec["seed"] == 0 and spec["name"] in ("k1", "arcflow-k8") else [args.iters]
        snaps = train(args.dataset, out, spec, args.iters, args.batch, staged)
        timing[key] = time.perf_counter() - t0
        print(f"trained {key} in {timing[key]:.0f}s", flush=True)
        adapters[key] = out
        if len(snaps) > 1:
            curve_dirs[spec["name"]] = snaps
    all_dirs = [str(p) for p in adapters.values()] + [str(p) for snaps in curve_dirs.values() for _, p in snaps[:-1]]
    report = evaluate(EvaluationConfig(adapters=all_dirs, out=str(work / "report"), num_samples=args.eval_samples,
                                       speed_repeats=1, speed_batch=50), progress=False)
    scored = {Path(r["extra"]["run"]).name: r for r in report["rows"] if r.get("extra")}
    rows = {key: scored[path.name] for key, path in adapters.items()}
    curves = {name: [(step, scored[Path(p).name]["psnr"]) for step, p in snaps] for name, snaps in curve_dirs.items()}
    result = {
        "dataset": args.dataset,
        "dataset_samples": sum(sizes.values()),
        "small_samples": sum(sizes[s] for s in small),
        "iters": args.iters,
        "batch": args.batch,
        "eval_samples": args.eval_samples,
        "teacher_rows": [r for r in report["rows"] if not r.get("extra")],
        "seed_to_seed_floor": report["seed_to_seed_floor"],
        "runs": [dict(spec, key=f"{spec['name']}-s{spec['seed']}", metrics=rows[f"{spec['name']}-s{spec['seed']}"],
                      train_seconds=timing[f"{spec['name']}-s{spec['seed']}"]) for spec in runs],
        "convergence": curves,
        "seconds": time.perf_counter() - started,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ablation.json").write_text(json.dumps(result, indent=2))
    table = summarize(rows, runs, curves, args.iters)
    teacher = "\n".join(f"Reference: {r['name']}: PSNR {r['psnr']:.2f} dB, FD vs teacher {r['fd_teacher']:.2f}."
                        for r in result["teacher_rows"][1:])
    text = (f"{table}\n{teacher}\nTeacher seed-to-seed Frechet floor: {result['seed_to_seed_floor']:.2f}. "
            f"Dataset: {result['dataset_samples']} trajectories (small variants: {result['small_samples']}).\n")
    (RESULTS / "ablation.md").write_text(text)
    plot(curves, RESULTS / "ablation.png")
    print(text)


def plot(curves: dict[str, list], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, points in curves.items():
        ax.plot([s for s, _ in points], [p for _, p in points], marker="o", label=name)
    ax.set_xlabel("training steps")
    ax.set_ylabel("PSNR vs teacher 50x2 (dB)")
    ax.set_title("Convergence, 2 NFE, digits teacher")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
