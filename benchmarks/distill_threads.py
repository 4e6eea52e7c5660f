"""`arcflow distill` steps/s on CPU with the default torch thread setting against each thread count.

    .venv/bin/python benchmarks/distill_threads.py [--iters 150 --threads 1 2 --repeats 2]

One digits dataset (the builder's own recording, 512 samples x 50 steps, float16) is written once;
then the real CLI (`arcflow distill`, one Ray Train worker, the main job's ArcFlow student: K=8,
momentum) trains ``--iters`` steps with the default thread setting and with each ``--threads``
value, interleaved ``--repeats`` times (the machine may be shared). Speed = the median
``it_per_s`` of ``metrics.jsonl``'s rows (one per 10 steps) after the first (start-up excluded). Writes
benchmarks/results/distill_threads.json and prints a table with default / best.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

RESULTS = Path(__file__).parent / "results" / "distill_threads.json"
ARCFLOW = [sys.executable, "-m", "arcflow.cli"]


def make_dataset(out: Path, samples: int) -> None:
    subprocess.run([*ARCFLOW, "generate-trajectories", "--teacher", "digits", "--out", str(out), "--num-samples",
                    str(samples), "--shard-size", "256", "--workers", "1"], check=True, capture_output=True)


def distill_speed(dataset: Path, out: Path, iters: int, threads: int | None) -> float:
    """Median steps/s of one `arcflow distill` run (rows after the first one)."""
    cmd = [*ARCFLOW, "distill", str(dataset), "--out", str(out), "--k", "8", "--momentum", "--iters", str(iters),
           "--checkpoint-every", str(iters)]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the default is what a user gets
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return statistics.median(r["it_per_s"] for r in rows[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=150)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    load = os.getloadavg()[0]
    scratch = Path(tempfile.mkdtemp(prefix="distill_threads_"))
    settings: list[int | None] = [None, *args.threads]
    speeds: dict[str, list[float]] = {str(t): [] for t in settings}
    try:
        make_dataset(scratch / "ds", args.samples)
        for r in range(args.repeats):
            for t in settings:
                run = scratch / f"run-{t}-{r}"
                speeds[str(t)].append(distill_speed(scratch / "ds", run, args.iters, t))
                shutil.rmtree(run, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    means = {t: statistics.mean(v) for t, v in speeds.items()}
    best = max((t for t in means if t != "None"), key=lambda t: means[t])
    ratio = means["None"] / means[best]

    print(f"arcflow distill, digits, K=8 momentum, {args.iters} steps, 1 worker, {os.cpu_count()} cores")
    print(f"{'threads':>10} {'steps/s (runs)':>30} {'mean':>8}")
    for t, v in speeds.items():
        label = "default" if t == "None" else t
        print(f"{label:>10} {', '.join(f'{s:.2f}' for s in v):>30} {means[t]:8.2f}")
    print(f"default / best ({best} thread(s)) = {ratio:.3f}")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "distill_threads",
        "command": "python benchmarks/distill_threads.py " + " ".join(sys.argv[1:]),
        "iters": args.iters, "samples": args.samples, "student": "K=8, momentum",
        "steps_per_second": speeds, "mean": means, "best_threads": int(best), "ratio_default_over_best": ratio,
        "load_before": load,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
