"""Builder scaling with the number of Ray workers, on the GPU-LATENCY SIMULATOR teacher.

    .venv/bin/python benchmarks/builder_scaling.py [--workers 1 2 4 --latency 0.2 --samples 192 --shard-size 16]

The ``gpu-latency-sim`` teacher (benchmarks/latency_sim.py) is not a model: every network call sleeps ``--latency`` seconds, as
a GPU call keeps its worker busy without using the CPU. It lets the builder's scaling (shards as
units of work, one teacher per actor, writes overlapped with compute) be measured on a 2-core
machine: workers ask for ``--cpus-per-worker`` (0.5 by default, so 4 fit on 2 cores), and the
latency is chosen so that per-shard CPU work (sampling arithmetic, Zarr + Parquet writes) is small
beside it. Throughput is the builder's steady state (``GenerationSummary.samples_per_second``, Ray
and worker start-up excluded); one Ray instance serves all runs. Speed-up = throughput / throughput
with 1 worker, all measured in this one run. Writes benchmarks/results/builder_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from arcflow.core.ray_runtime import start_ray

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

RESULTS = Path(__file__).parent / "results" / "builder_scaling.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--latency", type=float, default=0.2, help="simulated seconds per network call")
    parser.add_argument("--samples", type=int, default=192)
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cpus-per-worker", type=float, default=0.5)
    args = parser.parse_args()

    import ray

    from latency_sim import LatencySimTeacher

    from arcflow.pipeline.generate import generate_trajectories
    from arcflow.pipeline.generation_config import GenerationConfig

    t0 = time.perf_counter()
    start_ray()
    ray_start = time.perf_counter() - t0
    scratch = Path(tempfile.mkdtemp(prefix="builder_scaling_"))
    rows = []
    try:
        for workers in args.workers:
            config = GenerationConfig(
                out=str(scratch / f"w{workers}"), teacher=LatencySimTeacher, num_samples=args.samples,
                steps=args.steps, shard_size=args.shard_size, batch_size=args.shard_size, dtype="float16",
                workers=workers, cpus_per_worker=args.cpus_per_worker, teacher_options={"latency_s": args.latency},
            )
            t1 = time.perf_counter()
            summary = generate_trajectories(config, progress=False)
            total = time.perf_counter() - t1
            rows.append(
                {
                    "workers": workers,
                    "steady_seconds": summary.seconds,
                    "samples_per_second": summary.samples_per_second,
                    "worker_start_seconds": total - summary.seconds,
                    "shards": summary.shards_written,
                    "compute_seconds": summary.compute_seconds,
                    "write_seconds": summary.write_seconds,
                }
            )
            time.sleep(1.0)  # let the previous actors exit before the next run starts its own
    finally:
        ray.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)

    base = rows[0]["samples_per_second"]
    for row in rows:
        row["speedup"] = row["samples_per_second"] / base
    calls = args.steps  # true CFG runs both halves in one batched call per step
    ideal_shard = calls * args.latency
    print("teacher: gpu-latency-sim -- the GPU-LATENCY SIMULATOR (sleeps per network call; not a model)")
    print(
        f"{args.samples} samples, shards of {args.shard_size}, {args.steps} steps x {args.latency * 1000:.0f} ms per call "
        f"(>= {ideal_shard:.2f} s per shard), {args.cpus_per_worker} CPU per worker, {os.cpu_count()} cores"
    )
    print(f"Ray start-up {ray_start:.2f} s (excluded)")
    print()
    print(f"{'workers':>7} {'steady s':>9} {'samples/s':>10} {'speed-up':>9} {'worker start s':>15}")
    for row in rows:
        print(
            f"{row['workers']:7d} {row['steady_seconds']:9.2f} {row['samples_per_second']:10.2f} "
            f"{row['speedup']:8.2f}x {row['worker_start_seconds']:15.2f}"
        )
    last = rows[-1]
    print()
    print(f"speed-up at {last['workers']} workers: {last['speedup']:.2f}x  (goal >= 3.6x at 4 workers)")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "benchmark": "builder_scaling",
                "command": "python benchmarks/builder_scaling.py " + " ".join(sys.argv[1:]),
                "teacher": "gpu-latency-sim (GPU-latency simulator: sleeps per network call, not a model)",
                "latency_s": args.latency,
                "samples": args.samples,
                "shard_size": args.shard_size,
                "steps": args.steps,
                "cpus_per_worker": args.cpus_per_worker,
                "ray_start_seconds": ray_start,
                "rows": rows,
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
