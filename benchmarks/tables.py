"""Render the markdown tables the README embeds from the benchmark JSON files (no typing by hand).

    .venv/bin/python benchmarks/tables.py      # then: python scripts/update_readme.py
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def teacher_quality(r: dict) -> str:
    fd = r["frechet_distance"]
    cos = {int(k): v for k, v in r["velocity_cosine_per_step"].items()}
    lowest = min(cos, key=cos.get)
    return "\n".join([
        f"Embedded digits teacher (`benchmarks/teacher_quality.py`, {r['num_samples']} samples, "
        f"{r['steps']} steps x 2 (CFG {r['guidance']:g})):",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| accuracy for the prompted digit, {r['steps']}x2 | {100 * r['accuracy']:.1f}% |",
        f"| accuracy, 2 Euler steps | {100 * r['accuracy_2_steps']:.1f}% |",
        f"| Frechet distance, teacher {r['steps']}x2 vs held-out real | {fd['teacher_50x2_vs_heldout']:.2f} |",
        f"| Frechet distance, real train vs held-out (floor) | {fd['real_train_vs_heldout (floor)']:.2f} |",
        f"| Frechet distance, teacher 2 Euler steps vs held-out real | {fd['teacher_2_steps_vs_heldout']:.2f} |",
        f"| lowest mean cosine between consecutive velocities | {cos[lowest]:.4f} at step {lowest} of {r['steps']} |",
    ]) + "\n"


def storage_bytes(r: dict) -> str:
    lines = [
        f"Bytes per trajectory (`benchmarks/storage_bytes.py`, {r['steps']} steps, latent "
        f"{tuple(r['latent_shape'])}; x + u vs raw float32 = {r['results'][0]['raw_f32_xu_bytes_per_traj']:,} B):",
        "",
        "| storage dtype | compression | x + u bytes | ratio vs raw float32 | with index |",
        "|---|---|---:|---:|---:|",
    ]
    for row in r["results"]:
        lines.append(f"| {row['storage_dtype']} | {row['compression']} | {row['xu_bytes_per_traj']:,.0f} | "
                     f"{row['xu_ratio_vs_raw_f32']:.3f} | {row['total_bytes_per_traj']:,.0f} |")
    return "\n".join(lines) + "\n"


def builder(throughput: dict, scaling: dict) -> str:
    b = throughput["builder"]
    lines = [
        f"Trajectory builder, teacher {throughput['teacher']} (`benchmarks/builder_throughput.py`, "
        f"{throughput['samples']} samples x {throughput['steps']} steps, micro-batch {throughput['micro_batch']}, "
        f"{throughput['threads']} torch thread(s)): builder {b['samples_per_second']:.2f} "
        f"samples/s vs bare recording sampler {throughput['bare']['samples_per_second']:.2f} samples/s in the same "
        f"run: ratio {throughput['ratio_steady_builder_over_bare']:.2f} (Ray start-up {b['ray_start_seconds']:.1f} s "
        f"and worker start-up {b['worker_start_seconds']:.1f} s excluded).",
        "",
        f"Scaling with the GPU-latency simulator (`benchmarks/builder_scaling.py`; a stand-in teacher that "
        f"sleeps {scaling['latency_s']:g} s per network call, not a model):",
        "",
        "| workers | samples/s | speed-up |",
        "|---:|---:|---:|",
    ]
    for row in scaling["rows"]:
        lines.append(f"| {row['workers']} | {row['samples_per_second']:.2f} | {row['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    def load(name):
        path = RESULTS / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    written = []
    if (r := load("teacher_quality")) is not None:
        (RESULTS / "teacher_quality.md").write_text(teacher_quality(r))
        written.append("teacher_quality.md")
    if (r := load("storage_bytes")) is not None:
        (RESULTS / "storage_bytes.md").write_text(storage_bytes(r))
        written.append("storage_bytes.md")
    if (t := load("builder_throughput")) is not None and (s := load("builder_scaling")) is not None:
        (RESULTS / "builder.md").write_text(builder(t, s))
        written.append("builder.md")
    print("wrote " + ", ".join(written))


if __name__ == "__main__":
    main()
