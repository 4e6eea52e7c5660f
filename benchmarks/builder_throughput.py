"""Builder throughput vs the bare recording sampler, on one machine, one worker.

    .venv/bin/python benchmarks/builder_throughput.py [--samples 128 --steps 20 --batch-size 32]

Both sides run the same teacher over the same samples (same prompts and seeds) with the same
micro-batch size:

* bare: ``record_trajectories`` in this process, no Ray, no storage, at every thread count of
  ``--bare-threads`` (default 1 and all cores); the ratio uses the FASTEST;
* builder: ``generate_trajectories`` with 1 Ray worker (shard size = batch size) and its default
  settings (``--builder-threads`` overrides its torch threads), writing a real float16 Zarr +
  Parquet dataset to a temp directory.

The two sides alternate ``--repeats`` times (bare at every thread count, builder, ..., bare again),
because this shared VM's speed drifts by 10-30% between minutes; the ratio is the MEDIAN builder
run over the median of the fastest thread count's bare runs. Ray start-up and the worker's start-up
(process + teacher load) are timed separately; the ratio uses the builder's steady state (``GenerationSummary.samples_per_second``: from the first shard
submitted to the last shard committed). Teacher: the embedded ``digits`` teacher with its shipped
weights, or, when those are missing, the same architecture with untrained weights (identical compute
per call, said so in the output). Writes benchmarks/results/builder_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402
from arcflow.core.ray_runtime import start_ray

RESULTS = Path(__file__).parent / "results" / "builder_throughput.json"


def digits_teacher_options(scratch: Path) -> tuple[dict, str]:
    """Options for ``load_teacher("digits", ...)`` and a description of the weights used."""
    from arcflow.pipeline.digits import TEACHER_CONFIG_FILE, TEACHER_FILE, WEIGHTS_DIR

    if (WEIGHTS_DIR / TEACHER_FILE).is_file() and (WEIGHTS_DIR / TEACHER_CONFIG_FILE).is_file():
        return {}, "digits (shipped weights)"
    from safetensors.torch import save_file

    from arcflow.pipeline.digits_training import train_teacher_weights

    state, config = train_teacher_weights(seed=0, iters=1, progress=False)
    save_file(state, str(scratch / TEACHER_FILE))
    (scratch / TEACHER_CONFIG_FILE).write_text(json.dumps(config))
    return {"weights_dir": str(scratch)}, "digits architecture, UNTRAINED weights (shipped weights missing; same compute per call)"


def bare_throughput(options: dict, n: int, steps: int, batch: int, threads: int, seed: int) -> dict:
    from arcflow.pipeline.plan import plan_shards
    from arcflow.pipeline.recording import record_trajectories
    from arcflow.pipeline.registry import load_teacher

    torch.set_num_threads(threads)
    teacher = load_teacher("digits", device="cpu", **options)
    plans = plan_shards(n, batch, teacher.prompt_set(), seed)
    started = time.perf_counter()
    with torch.inference_mode():
        for plan in plans:  # what one worker does per shard, minus storage
            cond = teacher.encode_prompts(list(plan.prompts))
            noise = teacher.noise(plan.seeds)
            record_trajectories(teacher, cond, noise, steps=steps, guidance=teacher.default_guidance, micro_batch=batch)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "samples_per_second": n / seconds}


def builder_throughput(options: dict, n: int, steps: int, batch: int, seed: int, out: Path,
                       threads: int | None) -> dict:
    import ray

    from arcflow.pipeline.generate import generate_trajectories
    from arcflow.pipeline.generation_config import GenerationConfig, default_threads

    t0 = time.perf_counter()
    start_ray()
    ray_start = time.perf_counter() - t0
    try:
        config = GenerationConfig(
            out=str(out), teacher="digits", num_samples=n, steps=steps, shard_size=batch, batch_size=batch,
            seed=seed, dtype="float16", workers=1, threads=threads, teacher_options=options,
        )
        t1 = time.perf_counter()
        summary = generate_trajectories(config, progress=False)
        total = time.perf_counter() - t1
    finally:
        ray.shutdown()
    return {
        "ray_start_seconds": ray_start,
        "worker_start_seconds": total - summary.seconds,  # actor process + teacher load + describe
        "steady_seconds": summary.seconds,
        "samples_per_second": summary.samples_per_second,
        "end_to_end_samples_per_second": n / (ray_start + total),
        "compute_seconds": summary.compute_seconds,
        "write_seconds": summary.write_seconds,
        "shards": summary.shards_written,
        "threads": threads or default_threads(os.cpu_count() or 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bare-threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}),
                        help="torch thread counts the bare sampler runs at (the fastest one counts)")
    parser.add_argument("--repeats", type=int, default=3, help="builder runs (each between bare runs)")
    parser.add_argument("--builder-threads", type=int, default=None,
                        help="the builder's --threads (default: its own default)")
    args = parser.parse_args()

    load = os.getloadavg()[0]  # the 1-minute load average before the first run: how idle the machine was
    scratch = Path(tempfile.mkdtemp(prefix="builder_throughput_"))
    bare_runs: dict[int, list[dict]] = {t: [] for t in args.bare_threads}
    built_runs: list[dict] = []
    try:
        options, teacher_desc = digits_teacher_options(scratch)
        # bare, builder, bare, ..., bare: every builder run has bare runs on both sides
        for repeat in range(args.repeats + 1):
            for t in args.bare_threads:
                bare_runs[t].append(bare_throughput(options, args.samples, args.steps, args.batch_size, t, args.seed))
            if repeat < args.repeats:
                built_runs.append(builder_throughput(options, args.samples, args.steps, args.batch_size, args.seed,
                                                     scratch / f"ds{repeat}", args.builder_threads))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    by_threads = {
        t: {"seconds": statistics.median(r["seconds"] for r in runs),
            "samples_per_second": statistics.median(r["samples_per_second"] for r in runs), "runs": runs}
        for t, runs in bare_runs.items()
    }
    best = max(by_threads, key=lambda t: by_threads[t]["samples_per_second"])
    bare = {**by_threads[best], "threads": best, "by_threads": {str(t): v for t, v in by_threads.items()}}
    built = dict(sorted(built_runs, key=lambda r: r["samples_per_second"])[len(built_runs) // 2])  # the median run
    built["runs"] = [r["samples_per_second"] for r in built_runs]
    ratio = built["samples_per_second"] / bare["samples_per_second"]

    print(f"teacher: {teacher_desc}")
    print(f"{args.samples} samples x {args.steps} steps (true CFG), micro-batch {args.batch_size}, 1 worker, "
          f"{os.cpu_count()} cores")
    print()
    print(f"{'':40} {'seconds':>9} {'samples/s':>10}")
    for t, row in by_threads.items():
        for k, run in enumerate(row["runs"]):
            print(f"{f'bare, {t} thread(s), run {k + 1}':40} {run['seconds']:9.2f} {run['samples_per_second']:10.2f}")
        print(f"{f'bare, {t} thread(s), median':40} {row['seconds']:9.2f} {row['samples_per_second']:10.2f}")
    for k, sps in enumerate(built["runs"]):
        print(f"{f'builder, run {k + 1}':40} {'':9} {sps:10.2f}")
    label = f"builder, {built['threads']} thread(s), median run"
    print(f"{label:40} {built['steady_seconds']:9.2f} "
          f"{built['samples_per_second']:10.2f}")
    print(f"{'  of which shard compute (sum)':40} {built['compute_seconds']:9.2f}")
    print(f"{'  of which shard writes (sum)':40} {built['write_seconds']:9.2f}")
    print(f"{'Ray start-up':40} {built['ray_start_seconds']:9.2f}")
    print(f"{'worker start-up (teacher load)':40} {built['worker_start_seconds']:9.2f}")
    print(f"{'builder, end to end':40} {'':9} {built['end_to_end_samples_per_second']:10.2f}")
    print()
    print(f"builder steady-state / fastest bare ({best} thread(s)) = {ratio:.3f}  (goal >= 0.9; load before {load:.2f})")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "benchmark": "builder_throughput",
                "command": "python benchmarks/builder_throughput.py " + " ".join(sys.argv[1:]),
                "teacher": teacher_desc,
                "samples": args.samples,
                "steps": args.steps,
                "repeats": args.repeats,
                "micro_batch": args.batch_size,
                "bare": bare,
                "builder": built,
                "ratio_steady_builder_over_bare": ratio,
                "goal": 0.9,
                "load_before": load,
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
