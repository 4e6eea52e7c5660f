"""Does the storage format change the student? PSNR of students trained on the same teacher run
stored four ways: format v1 float16 (v1's default), v2 float16 with keyframes every 5 steps (v2's
default), v2 float8_e4m3 velocities, and the lossless float32 reference (v2, every state kept).

    .venv/bin/python benchmarks/format_quality.py                  # 2048 trajectories, 1500 steps each
    .venv/bin/python benchmarks/format_quality.py --quick          # smoke-test sizes

One digits teacher run (`generate-trajectories`, float32, every state) is rewritten into each
format from the same arrays; every student uses the same seed, iterations, batch and data order (the
stream's order depends on the seed and the shard sizes only), so what differs is the stored bytes.
All students are scored in ONE `arcflow evaluate` pass on held-out noise (PSNR vs the teacher's 50x2
sample from the same noise). Writes benchmarks/results/format_quality.json and .md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
#: name -> how the teacher run is stored
VARIANTS = {
    "v1-float16": {"format": 1, "storage_dtype": "float16"},
    "v2-float16-k5": {"format": 2, "storage_dtype": "float16", "keyframe_every": 5},
    "v2-float8-k5": {"format": 2, "storage_dtype": "float8_e4m3", "keyframe_every": 5},
    "v2-float32-k1": {"format": 2, "storage_dtype": "float32", "keyframe_every": 1},
}


def teacher_run(path: Path, samples: int, shard_size: int) -> str:
    """The digits teacher's trajectories, stored losslessly (float32, every state)."""
    from arcflow.pipeline.generate import generate_trajectories
    from arcflow.pipeline.generation_config import GenerationConfig

    if not (path / "dataset.json").is_file():
        generate_trajectories(GenerationConfig(out=str(path), num_samples=samples, shard_size=shard_size, dtype="float32",
                                               keyframe_every=1, workers=1), progress=False)
    return str(path)


def rewrite(source: str, target: Path, variant: dict) -> None:
    """Write the source dataset's arrays again in ``variant``'s format (same shards, same rows)."""
    import dataclasses

    from arcflow.storage import create_or_open_dataset, open_dataset
    from v1_writer import V1Spec, create_v1_dataset

    reader = open_dataset(source)
    spec = reader.spec
    shutil.rmtree(target, ignore_errors=True)
    if variant["format"] == 1:
        names = {f.name for f in dataclasses.fields(V1Spec)}
        fields = {k: v for k, v in spec.to_dict().items() if k in names and k not in ("samples_per_chunk", "format_version")}
        writer = create_v1_dataset(str(target), V1Spec(**{**fields, "storage_dtype": variant["storage_dtype"]}))
    else:
        writer = create_or_open_dataset(str(target), dataclasses.replace(
            spec, storage_dtype=variant["storage_dtype"], keyframe_every=variant["keyframe_every"],
            samples_per_chunk=0, steps_per_chunk=0))
    index = reader.index(columns=["shard", "row", "step", "prompt"])
    for shard in sorted(reader.committed_shards()):
        d = reader.read_shard(shard)
        rows = index[(index["shard"] == shard) & (index["step"] == 0)].sort_values("row")
        writer.write_shard(shard, d["x"], d["u"], d["sigmas"], {k: d[k] for k in spec.cond_spec}, d["sample_id"],
                           d["seed"], rows["prompt"].tolist(), d["guidance"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="benchmarks/.cache/format_quality")
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--iters", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--eval-samples", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny smoke-test sizes")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.shard_size, args.iters, args.eval_samples = 64, 32, 10, 40

    import torch

    from ablation import train
    from arcflow.distill.evaluate import EvaluationConfig, evaluate
    from arcflow.storage import open_dataset

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    started = time.perf_counter()
    source = teacher_run(work / f"teacher-{args.samples}", args.samples, args.shard_size)
    runs, sizes = {}, {}
    for name, variant in VARIANTS.items():
        data = work / f"data-{name}"
        rewrite(source, data, variant)
        b = open_dataset(str(data)).bytes_on_disk()
        sizes[name] = (b["x"] + b["u"] + b.get("u_scale", 0)) / b["samples"]
        out = work / f"run-{name}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        train(str(data), out, {"seed": 0}, args.iters, args.batch, [args.iters])
        print(f"trained on {name} in {time.perf_counter() - t0:.0f}s", flush=True)
        runs[name] = out
    report_dir = work / "report"
    shutil.rmtree(report_dir, ignore_errors=True)
    report = evaluate(EvaluationConfig(adapters=[str(p) for p in runs.values()], out=str(report_dir),
                                       num_samples=args.eval_samples, speed_repeats=1, speed_batch=50), progress=False)
    scored = {Path(r["extra"]["run"]).name: r for r in report["rows"] if r.get("extra")}
    rows = {name: scored[path.name] for name, path in runs.items()}
    reference = rows["v1-float16"]["psnr"]
    result = {
        "machine": "CPU (2 cores), digits teacher, latent (16, 4), 50 steps, NFE 2",
        "samples": args.samples, "iters": args.iters, "batch": args.batch, "eval_samples": args.eval_samples,
        "variants": {name: {**VARIANTS[name], "xu_bytes_per_trajectory": sizes[name], "psnr": rows[name]["psnr"],
                            "psnr_minus_v1": rows[name]["psnr"] - reference, "fd_teacher": rows[name]["fd_teacher"]}
                     for name in runs},
        "seconds": time.perf_counter() - started,
    }
    lines = [f"Students trained {args.iters} steps (batch {args.batch}, seed 0) on one digits teacher run of "
             f"{args.samples} trajectories stored four ways; PSNR vs the teacher on {args.eval_samples} held-out noises.",
             "", "| data | x + u bytes / trajectory | PSNR (dB) | vs v1 float16 (dB) | FD vs teacher |", "|---|---:|---:|---:|---:|"]
    for name, v in result["variants"].items():
        lines.append(f"| {name} | {v['xu_bytes_per_trajectory']:,.0f} | {v['psnr']:.3f} | {v['psnr_minus_v1']:+.3f} | "
                     f"{v['fd_teacher']:.2f} |")
    text = "\n".join(lines) + "\n"
    results = work if args.quick else RESULTS  # a smoke run never overwrites the committed figures
    results.mkdir(parents=True, exist_ok=True)
    (results / "format_quality.json").write_text(json.dumps(result, indent=2))
    (results / "format_quality.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
