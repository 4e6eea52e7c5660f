"""Streaming loader vs trainer: throughput ratio and peak memory with 1x vs 10x the shards.

    .venv/bin/python benchmarks/loader.py            # prints a table, writes benchmarks/results/loader.json

* loader throughput: samples/s that `TrajectoryStream` + a DataLoader deliver (one pass, shuffled),
  on trajectories shaped like the digits teacher's (50 steps, latent 16x4, float16 storage);
* trainer consumption: samples/s one training step of the default student (K=8, LoRA r=16) on the
  embedded digits teacher consumes (forward + backward + AdamW, batch 64), measured in this process;
* peak RSS: a fresh process streams one full epoch of a dataset with 1x and with 10x the shards
  (same shard size); streaming holds one shard (+ the shuffle buffer) per worker, so the peak should
  not grow with the dataset.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"
STEPS, LATENT, SHARD = 50, (16, 4), 500


def write_synthetic(url: Path, shards: int) -> None:
    """Trajectory-shaped random data through the real writer (float16, compressed)."""
    from arcflow.pipeline.schedule import shifted_schedule
    from arcflow.storage.format import DatasetSpec
    from arcflow.storage.writer import create_or_open_dataset

    sigmas = shifted_schedule(STEPS, 1.0).numpy()
    spec = DatasetSpec(
        teacher_id="synthetic", teacher_revision="0", latent_shape=LATENT, sigmas=sigmas, shift=1.0,
        guidance=3.0, num_samples=shards * SHARD, shard_size=SHARD, seed=0,
        cond_spec={"prompt_embeds": ((4, 32), "float32"), "pooled_prompt_embeds": ((32,), "float32")},
    )
    writer = create_or_open_dataset(str(url), spec)
    rng = np.random.default_rng(0)
    for shard in range(shards):
        noise = rng.standard_normal((SHARD, 1, *LATENT)).astype(np.float32)
        data = rng.uniform(-1, 1, (SHARD, 1, *LATENT)).astype(np.float32)
        s = sigmas.reshape(1, -1, 1, 1).astype(np.float32)
        x = (1 - s) * data + s * noise
        u = (x[:, :-1] - x[:, 1:]) / (s[:, :-1] - s[:, 1:])
        ids = list(range(shard * SHARD, (shard + 1) * SHARD))
        writer.write_shard(
            shard, x=x, u=u, sigmas=sigmas,
            cond={"prompt_embeds": rng.standard_normal((SHARD, 4, 32)).astype(np.float32),
                  "pooled_prompt_embeds": rng.standard_normal((SHARD, 32)).astype(np.float32)},
            sample_ids=ids, seeds=ids, prompts=[f"p{i % 10}" for i in ids], guidance=3.0,
        )


def stream_epoch(url: str, workers: int, batch: int) -> dict:
    """One epoch through the loader; returns samples/s and this process's peak RSS."""
    import resource

    from arcflow.storage.streaming import TrajectoryStream

    stream = TrajectoryStream(url, seed=0, shuffle_buffer=512, epochs=1)
    loader = torch.utils.data.DataLoader(stream, batch_size=batch, num_workers=workers)
    start = time.perf_counter()
    count = 0
    for item in loader:
        count += item["x"].shape[0]
    seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"samples": count, "seconds": seconds, "samples_per_s": count / seconds,
            "peak_rss_mb": peak_kb / 1024, "peak_rss_children_mb": children_kb / 1024}


def trainer_consumption(batch: int, steps: int = 20) -> float:
    """Samples/s of the default student's training step on the digits teacher (synthetic batch)."""
    from arcflow.distill.loss import segment_batch, segment_loss
    from arcflow.distill.student import StudentConfig, build_student
    from arcflow.pipeline.registry import load_teacher

    teacher = load_teacher("digits")
    student = build_student(teacher, StudentConfig(), inplace=True)
    optimizer = torch.optim.AdamW(student.trainable_parameters(), lr=1e-3)
    cond = teacher.encode_prompts(teacher.prompt_set() * (batch // 10 + 1))
    sigmas = teacher.sigmas(STEPS).float()
    batch_data = {
        "x": torch.randn(batch, STEPS + 1, *LATENT), "u": torch.randn(batch, STEPS, *LATENT), "sigmas": sigmas,
        **{k: v[:batch] for k, v in cond.items()},
    }
    items = segment_batch(batch_data.pop("x"), batch_data.pop("u"), batch_data.pop("sigmas"), [0, STEPS // 2, STEPS],
                          torch.arange(batch) % 2, batch_data)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss, _ = segment_loss(student, items, 2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return batch / float(np.median(times[3:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--shards", type=int, default=4, help="shards in the 1x dataset (10x gets ten times as many)")
    parser.add_argument("--_child", nargs=3, metavar=("URL", "WORKERS", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        print(json.dumps(stream_epoch(args._child[0], int(args._child[1]), int(args._child[2]))))
        return
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        small, large = Path(tmp) / "x1", Path(tmp) / "x10"
        write_synthetic(small, args.shards)
        write_synthetic(large, args.shards * 10)

        def child(url, workers):
            out = subprocess.run([sys.executable, __file__, "--_child", str(url), str(workers), str(args.batch)],
                                 capture_output=True, text=True, check=True)
            return json.loads(out.stdout.strip().splitlines()[-1])

        runs = {f"{name}_w{w}": child(url, w) for name, url in (("x1", small), ("x10", large)) for w in (0, 2)}
    consume = trainer_consumption(args.batch)
    loader_rate = max(runs["x10_w0"]["samples_per_s"], runs["x10_w2"]["samples_per_s"])
    result = {
        "batch": args.batch,
        "shard_size": SHARD,
        "shards_1x": args.shards,
        "runs": runs,
        "trainer_samples_per_s": consume,
        "loader_over_trainer": loader_rate / consume,
        "rss_10x_over_1x_workers0": runs["x10_w0"]["peak_rss_mb"] / runs["x1_w0"]["peak_rss_mb"],
        "rss_10x_over_1x_workers2": (runs["x10_w2"]["peak_rss_mb"] + runs["x10_w2"]["peak_rss_children_mb"])
        / (runs["x1_w2"]["peak_rss_mb"] + runs["x1_w2"]["peak_rss_children_mb"]),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "loader.json").write_text(json.dumps(result, indent=2))
    lines = [
        "| loader run | samples | samples/s | peak RSS (MB, main + workers) |",
        "|---|---:|---:|---:|",
    ]
    for name, r in runs.items():
        lines.append(f"| {name} | {r['samples']} | {r['samples_per_s']:.0f} | {r['peak_rss_mb']:.0f} + {r['peak_rss_children_mb']:.0f} |")
    lines += [
        "",
        f"Trainer consumption (default student, batch {args.batch}): {consume:.0f} samples/s; "
        f"loader / trainer = {result['loader_over_trainer']:.1f}x (goal >= 5x).",
        f"Peak RSS 10x / 1x shards: {result['rss_10x_over_1x_workers0']:.3f} (0 workers), "
        f"{result['rss_10x_over_1x_workers2']:.3f} (2 workers) (goal: within 10%).",
    ]
    table = "\n".join(lines)
    (RESULTS / "loader.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
