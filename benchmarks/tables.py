"""Render the markdown tables docs/benchmarks.md embeds from the benchmark JSON files (no typing by hand).

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


def builder(throughput: dict, scaling: dict, distill: dict | None) -> str:
    b = throughput["builder"]
    load = throughput.get("load_before")
    lines = [
        f"Trajectory builder, teacher {throughput['teacher']} (`benchmarks/builder_throughput.py`, "
        f"{throughput['samples']} samples x {throughput['steps']} steps, micro-batch {throughput['micro_batch']}, "
        f"builder {b['threads']} torch thread(s)): builder {b['samples_per_second']:.2f} samples/s vs the bare "
        f"recording sampler at its fastest thread count ({throughput['bare']['threads']}) "
        f"{throughput['bare']['samples_per_second']:.2f} samples/s in the same run"
        + (f" (medians of {throughput['repeats']} builder runs, each between bare runs: "
           f"{', '.join(f'{v:.1f}' for v in b['runs'])} samples/s)" if "repeats" in throughput else "")
        + f": ratio {throughput['ratio_steady_builder_over_bare']:.2f} (Ray start-up {b['ray_start_seconds']:.1f} s "
        f"and worker start-up {b['worker_start_seconds']:.1f} s excluded)"
        + (f"; 1-minute load average {load:.2f} before the run." if load is not None else "."),
        "",
        f"Scaling with the GPU-latency simulator (`benchmarks/builder_scaling.py`; a stand-in teacher that "
        f"sleeps {scaling['latency_s']:g} s per network call, not a model):",
        "",
        "| workers | samples/s | speed-up |",
        "|---:|---:|---:|",
    ]
    for row in scaling["rows"]:
        lines.append(f"| {row['workers']} | {row['samples_per_second']:.2f} | {row['speedup']:.2f}x |")
    if distill is not None:
        lines += [
            "",
            f"`arcflow distill` on CPU (`benchmarks/distill_threads.py`: digits, {distill['student']}, "
            f"{distill['iters']} steps, 1 worker, {distill['machine']['cpus']} cores, 1-minute load average "
            f"{distill['load_before']:.2f} before the run; median steps/s after the first logged row, runs interleaved):",
            "",
            "| torch threads | steps/s per run | mean |",
            "|---|---|---:|",
        ]
        for threads, runs in distill["steps_per_second"].items():
            label = "default (`--threads` unset)" if threads == "None" else threads
            lines.append(f"| {label} | {', '.join(f'{v:.2f}' for v in runs)} | {distill['mean'][threads]:.2f} |")
        lines += ["", f"default / best ({distill['best_threads']} thread(s)): {distill['ratio_default_over_best']:.2f}."]
    return "\n".join(lines) + "\n"


def _num(value, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def gpu_scale(r: dict) -> str:
    """Teacher speed, builder vs bare sampler, distill step time/memory, student vs teacher."""
    if r["reduced"]:
        where = (f"**{r['device']}, REDUCED configuration** (a few narrow blocks, tiny images, "
                 f"{r['settings']['text_tokens']} text tokens): a smoke run of the code path, NOT a speed or "
                 "memory figure of FLUX.1-dev or Qwen-Image")
    else:
        where = f"**{r['device']}**, full FLUX.1-dev / Qwen-Image configurations with random bf16 weights"
    fams = r["families"].values()
    lines = [
        f"GPU scale (`benchmarks/gpu_scale.py`, `{r['command']}`) on {where}. "
        f"All trajectories finite: {'yes' if r.get('all_finite') else 'NO'}.",
        "",
        "| model | resolution | tokens | s/NFE batch 1 | s/NFE batch 4 | NFE per trajectory | s per trajectory (batch 1) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for f in fams:
        for label, row in f["resolutions"].items():
            lines.append(f"| {f['name']} | {label} | {row['tokens']} | {row['s_per_nfe_b1']:.4f} | "
                         f"{row['s_per_nfe_b4']:.4f} | {row['nfe_per_trajectory']} | {row['s_per_trajectory_b1']:.2f} |")
    lines += ["", "| model | resolution | samples | bare samples/s | builder samples/s | builder / bare (goal >= 0.95) "
              "| GB written per hour | write / compute s per shard | CPU side limits |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for f in fams:
        if "builder" in f:
            b = f["builder"]
            lines.append(f"| {f['name']} | {b['resolution']} | {b['samples']} | {b['bare_samples_per_second']:.3f} | "
                         f"{b['steady_samples_per_second']:.3f} | {b['ratio']:.2f} | {b['gb_per_hour']:.2f} | "
                         f"{b['mean_write_s_per_shard']:.2f} / {b['mean_compute_s_per_shard']:.2f} | "
                         f"{'yes' if b['cpu_side_limits'] else 'no'} |")
    lines += ["", "| model | distill step (K, LoRA rank) | gradient checkpointing | batch | s per step | peak GPU memory (GB) |",
              "|---|---|---|---:|---:|---:|"]
    for f in fams:
        d = f.get("distill")
        for row in (d or {}).get("rows", []):
            step = "OOM" if row["oom"] else _num(row["s_per_step"], ".3f")
            peak = "OOM" if row["oom"] else _num(row["peak_gb"], ".1f")
            lines.append(f"| {f['name']} | K={d['k']}, rank {d['lora_rank']} ({100 * d['trainable_share']:.1f}% "
                         f"trainable) | {'on' if row['gradient_checkpointing'] else 'off'} | {row['batch']} | {step} | {peak} |")
    lines += ["", "| model | resolution | teacher s (NFE) | 2-NFE student s | speed-up |", "|---|---|---:|---:|---:|"]
    for f in fams:
        if "student_vs_teacher" in f:
            v = f["student_vs_teacher"]
            lines.append(f"| {f['name']} | {v['resolution']} | {v['teacher_s']:.2f} ({v['teacher_nfe']}) | "
                         f"{v['student_s']:.3f} | {v['speedup']:.1f}x |")
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
        (RESULTS / "builder.md").write_text(builder(t, s, load("distill_threads")))
        written.append("builder.md")
    if (r := load("gpu_scale")) is not None:
        (RESULTS / "gpu_scale.md").write_text(gpu_scale(r))
        written.append("gpu_scale.md")
    print("wrote " + ", ".join(written))


if __name__ == "__main__":
    main()
