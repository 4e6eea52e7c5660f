"""FLUX.1-dev / Qwen-Image at their real sizes on one GPU: teacher speed, builder vs bare sampler,
distill-step time and memory, 2-NFE student vs 50-step teacher. One command:

    python benchmarks/gpu_scale.py --out benchmarks/results/gpu_scale.json

The transformers are the real diffusers classes with the published configurations and RANDOM bf16
weights (benchmarks/random_teachers.py: built on the meta device, allocated on the GPU with
``to_empty`` and filled in place; nothing is downloaded or written), with random stored embeddings
of the real shapes (FLUX: T5 512x4096 + pooled 768; Qwen-Image: 512x3584 + mask). Per family:

1. teacher seconds per network evaluation (one forward) at batch 1 and 4, and per 50-step
   trajectory at batch 1 (FLUX: 50 evaluations, embedded guidance; Qwen-Image: 50 x 2, true CFG
   batched as one forward of 2), at 1024x1024 (4096 tokens) and 512x512 (1024 tokens); every
   trajectory is checked for NaN/inf;
2. the builder (``generate_trajectories``: one Ray GPU worker, real Zarr + Parquet shards in 16-bit on
   local disk) vs the bare recording sampler (``record_trajectories`` in this process) on the same
   samples and micro-batch: steady-state ratio (goal >= 0.95), GB written per hour, and whether
   the CPU side (compression, copies, writes) takes longer per shard than the GPU compute;
3. one distill step of the default recipe at K=16, LoRA rank 256, bf16 autocast, with and
   without gradient checkpointing, at batch 1, 2, 4: seconds per step and peak GPU memory
   (``torch.cuda.max_memory_allocated``; weights, LoRA, AdamW state and activations; OOM recorded);
4. wall time of the 2-NFE student vs the 50-step teacher on the same sample (batch 1).

The defaults are sized to fit one 10-minute session on one H100 (not yet run there; ``--families
flux`` and ``--families qwen`` split it, ``--builder-samples`` / ``--shard-size`` / ``--micro-batch``
scale the builder comparison up).

Without CUDA (or with ``--reduced``) the same code runs a REDUCED configuration (a few narrow
blocks, 64x64 and 32x32 images, 16 text tokens) in seconds: a smoke test, not a measurement of the
real models; the JSON says which (``device``, ``reduced``). The JSON is rewritten after every
measurement, so a run cut short keeps what it measured. ``benchmarks/tables.py`` renders it for
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from random_teachers import RandomTeacherFactory, load_random_teacher, random_transformer  # noqa: E402
from tables import gpu_scale as render_markdown  # noqa: E402
from arcflow.core.ray_runtime import start_ray

log = logging.getLogger("gpu_scale")

RESULTS = Path(__file__).parent / "results" / "gpu_scale.json"
FAMILIES = {"flux": ("random-flux-dev", "FLUX.1-dev"), "qwen": ("random-qwen-image", "Qwen-Image")}
#: (label, pixels) per resolution; the first is the main one (builder, distill, student ratio).
FULL = dict(resolutions=[("1024x1024", 1024), ("512x512", 512)], text_tokens=512)
REDUCED = dict(resolutions=[("64x64 (reduced)", 64), ("32x32 (reduced)", 32)], text_tokens=16)
#: The official ArcFlow recipe's size on top of `arcflow distill`'s defaults.
RECIPE = dict(k=16, lora_rank=256)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], Any], device: torch.device, repeats: int, warm_up: bool = True) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls (after one warm-up call)."""
    if warm_up:
        fn()
        sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Report:
    """The JSON being built; rewritten after every measurement."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path, self.data = path, data

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2) + "\n")


def teacher_speed(teacher: Any, steps: int, device: torch.device, repeats: int) -> dict[str, Any]:
    """Seconds per network evaluation at batch 1 and 4, and one recorded trajectory at batch 1."""
    from arcflow.pipeline.recording import record_trajectories

    prompts = teacher.prompt_set()
    row: dict[str, Any] = {"tokens": teacher.latent_shape[0]}
    with torch.inference_mode():
        for batch in (1, 4):
            cond = teacher.encode_prompts(prompts[:batch])
            x = teacher.noise(range(batch)).to(teacher.dtype)
            sigma = torch.full((batch,), 0.5, device=teacher.device)
            row[f"s_per_nfe_b{batch}"] = median_seconds(lambda: teacher.conditional_velocity(x, sigma, cond), device,
                                                        repeats)
        cond = teacher.encode_prompts(prompts[:1])
        t0 = time.perf_counter()
        xs, us, _ = record_trajectories(teacher, cond, teacher.noise([0]), steps=steps, micro_batch=None)
        sync(device)
        row["s_per_trajectory_b1"] = time.perf_counter() - t0
    row["nfe_per_trajectory"] = steps * (2 if teacher.true_cfg else 1)
    row["finite"] = bool(torch.isfinite(xs).all() and torch.isfinite(us).all())
    row["max_abs_x"], row["u_rms"] = float(xs.abs().max()), float(us.pow(2).mean().sqrt())
    return row


def bare_sampler(teacher: Any, plans: list, steps: int, micro_batch: int, device: torch.device) -> dict[str, Any]:
    """What one builder worker computes per shard, minus Ray and storage (as builder_throughput.py)."""
    from arcflow.pipeline.recording import record_trajectories

    samples = sum(len(p) for p in plans)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for plan in plans:
            cond = teacher.encode_prompts(list(plan.prompts))
            record_trajectories(teacher, cond, teacher.noise(plan.seeds), steps=steps, micro_batch=micro_batch)
    sync(device)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "samples_per_second": samples / seconds}


def builder(teacher_id: str, options: dict[str, Any], samples: int, steps: int, shard_size: int, micro_batch: int,
            use_gpu: bool, scratch: Path) -> dict[str, Any]:
    """``generate_trajectories`` with one worker (on the Ray instance ``main`` started); steady
    state = the commits after the first shard."""
    from arcflow.pipeline.generate import generate_trajectories
    from arcflow.pipeline.generation_config import GenerationConfig

    commits: list[tuple[float, dict[str, Any]]] = []
    config = GenerationConfig(
        out=str(scratch / "ds"), teacher=RandomTeacherFactory(teacher_id), num_samples=samples, steps=steps, shard_size=shard_size,
        batch_size=micro_batch, dtype="float16", workers=1, gpus_per_worker=1.0 if use_gpu else None,
        teacher_options=options,
    )
    summary = generate_trajectories(config, progress=False,
                                    on_shard_committed=lambda r: commits.append((time.perf_counter(), r)))
    written = sum(f.stat().st_size for f in (scratch / "ds").rglob("*") if f.is_file())
    steady_samples = sum(r["samples"] for _, r in commits[1:])
    steady_s = commits[-1][0] - commits[0][0]
    per_sample = written / samples
    rate = steady_samples / steady_s if steady_samples and steady_s > 0 else summary.samples_per_second
    compute = [r["compute_s"] for _, r in commits]
    write = [r["write_s"] for _, r in commits]
    return {
        "samples": samples,
        "shards": summary.shards_written,
        "steady_samples_per_second": rate,
        "run_samples_per_second": summary.samples_per_second,
        "bytes_written": written,
        "gb_per_hour": per_sample * rate * 3600 / 1e9,
        "mean_compute_s_per_shard": statistics.mean(compute),
        "mean_write_s_per_shard": statistics.mean(write),
        # writes overlap the next shard's compute; they limit throughput only when they take longer
        "cpu_side_limits": statistics.mean(write) > statistics.mean(compute),
    }


def distill_steps(teacher: Any, steps: int, batches: list[int], device: torch.device) -> tuple[Any, list[dict], dict]:
    """Build the recipe's student on the teacher's transformer (in place) and time one step per
    (checkpointing, batch); returns the student, the rows and its trainable parameter count/share."""
    import types

    from arcflow.distill.config import DistillConfig
    from arcflow.distill.loss import segment_batch, segment_loss
    from arcflow.distill.parallel import prepare_student
    from arcflow.distill.segments import segment_step_indices
    from arcflow.distill.student import build_student

    recipe = DistillConfig.from_dict(dict(dataset="", out="", bf16=True, **RECIPE))
    student = build_student(teacher, dataclasses.replace(recipe.student, init_seed=recipe.seed), inplace=True).train()
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=recipe.lr, weight_decay=recipe.weight_decay)
    bounds = segment_step_indices(steps, recipe.student.nfe)
    sigmas = teacher.sigmas(steps).float()
    prompts = teacher.prompt_set()

    def batch_of(size: int) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(size)
        shape = (size, steps + 1, *teacher.latent_shape)
        return {"x": torch.randn(shape, generator=gen).to(device),
                "u": torch.randn((size, steps, *teacher.latent_shape), generator=gen).to(device),
                "sigmas": sigmas.to(device), **{k: v.float() for k, v in teacher.encode_prompts(prompts[:size]).items()}}

    def step(batch: dict[str, Any]) -> float:
        segments = torch.arange(batch["x"].shape[0], device=batch["x"].device) % recipe.student.nfe
        cond = {k: v for k, v in batch.items() if k not in ("x", "u", "sigmas")}
        items = segment_batch(batch["x"], batch["u"], batch["sigmas"], bounds, segments, cond)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, _ = segment_loss(student, items, recipe.student.nfe)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, recipe.grad_clip)
        optimizer.step()
        return loss.item()

    rows = []
    step(batch_of(1))  # allocates the AdamW state, so every row's peak includes it
    for checkpointing in (True, False):
        if checkpointing:
            prepare_student(student, types.SimpleNamespace(gradient_checkpointing=True, fsdp=False), 1)
        else:
            student.transformer.disable_gradient_checkpointing()
        for size in batches:
            row: dict[str, Any] = {"batch": size, "gradient_checkpointing": checkpointing}
            try:
                data = batch_of(size)
                free_memory()
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                row["s_per_step"] = median_seconds(lambda: step(data), device, repeats=2)
                row["peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
                row["oom"] = False
            except torch.cuda.OutOfMemoryError:
                row.update(s_per_step=None, peak_gb=None, oom=True)
                optimizer.zero_grad(set_to_none=True)
            data = None
            free_memory()
            rows.append(row)
    student.transformer.disable_gradient_checkpointing()
    share = sum(p.numel() for p in trainable) / sum(p.numel() for p in student.transformer.parameters())
    return student, rows, {"trainable_params": sum(p.numel() for p in trainable), "trainable_share": share}


def measure_family(family: str, args: argparse.Namespace, settings: dict, device: torch.device,
                   report: Report) -> None:
    from arcflow.pipeline.plan import plan_shards
    from arcflow.pipeline.recording import sample_teacher
    from arcflow.distill.runs import sample_latents
    from arcflow.distill.arcflow_scheduler import ArcFlowScheduler

    teacher_id, name = FAMILIES[family]
    out: dict[str, Any] = {"name": name, "teacher_id": teacher_id, "resolutions": {}}
    report.data["families"][family] = out
    dtype = torch.bfloat16
    transformer = random_transformer(family, args.reduced, device, dtype, args.seed, args.weight_scale)
    out["params"] = sum(p.numel() for p in transformer.parameters())
    options = dict(torch_dtype="bfloat16", seed=args.seed, reduced=args.reduced, text_tokens=settings["text_tokens"],
                   weight_scale=args.weight_scale)

    def teacher_at(pixels: int) -> Any:
        return load_random_teacher(teacher_id, device, height=pixels, width=pixels, transformer=transformer, **options)

    for label, pixels in settings["resolutions"]:
        log.info("%s %s: teacher speed", name, label)
        out["resolutions"][label] = teacher_speed(teacher_at(pixels), args.steps, device, args.repeats)
        report.save()

    label, pixels = settings["resolutions"][0]
    teacher = teacher_at(pixels)
    plans = plan_shards(args.builder_samples, args.shard_size, teacher.prompt_set(), args.seed)
    log.info("%s %s: bare recording sampler", name, label)
    bare = bare_sampler(teacher, plans, args.steps, args.micro_batch, device)
    prompts, seeds = teacher.prompt_set()[:1], [0]  # warm by now: one timed trajectory
    with torch.inference_mode():
        cond, noise = teacher.encode_prompts(prompts), teacher.noise(seeds)
        teacher_s = median_seconds(lambda: sample_teacher(teacher, prompts, seeds, steps=args.steps, micro_batch=None),
                                   device, repeats=1, warm_up=False)
    log.info("%s %s: distill steps", name, label)
    student, rows, share = distill_steps(teacher, args.steps, args.distill_batches, device)
    out["distill"] = {"resolution": label, **RECIPE, "bf16_autocast": True, **share, "rows": rows}
    report.save()
    with torch.inference_mode():
        student.eval()
        config = student.config
        scheduler = ArcFlowScheduler(k=config.k, weight_groups=config.weight_groups, momentum=config.momentum,
                                     channels=int(teacher.latent_shape[-1]), segment_sigmas=teacher.sigmas(2).tolist())
        student_s = median_seconds(lambda: sample_latents(student, scheduler, noise, cond), device, repeats=3)
    out["student_vs_teacher"] = {"resolution": label, "batch": 1, "teacher_steps": args.steps,
                                 "teacher_nfe": args.steps * (2 if teacher.true_cfg else 1), "student_nfe": 2,
                                 "teacher_s": teacher_s, "student_s": student_s, "speedup": teacher_s / student_s}
    report.save()
    del student, teacher, transformer
    free_memory()

    log.info("%s %s: builder (Ray, Zarr + Parquet)", name, label)
    scratch = Path(tempfile.mkdtemp(prefix="gpu_scale_", dir=args.scratch))
    try:
        built = builder(teacher_id, {**options, "height": pixels, "width": pixels}, args.builder_samples, args.steps,
                        args.shard_size, args.micro_batch, device.type == "cuda", scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    out["builder"] = {"resolution": label, "micro_batch": args.micro_batch, "shard_size": args.shard_size,
                      "storage_dtype": "float16", "bare_samples_per_second": bare["samples_per_second"], **built,
                      "ratio": built["steady_samples_per_second"] / bare["samples_per_second"], "goal": 0.95}
    report.save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON to write (the .md table goes beside it)")
    parser.add_argument("--reduced", action="store_true", help="tiny configuration (automatic without CUDA)")
    parser.add_argument("--families", nargs="+", choices=sorted(FAMILIES), default=["flux", "qwen"])
    parser.add_argument("--steps", type=int, default=50, help="teacher sampling steps")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per network-evaluation figure")
    parser.add_argument("--builder-samples", type=int, default=3, help="trajectories the builder comparison records")
    parser.add_argument("--shard-size", type=int, default=1)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--distill-batches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--weight-scale", type=float, default=1.0, help="random weights ~ N(0, scale^2 / fan_in)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scratch", default=None, help="directory for the builder's dataset (default: system temp)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    cuda = torch.cuda.is_available()
    args.reduced = args.reduced or not cuda
    device = torch.device("cuda" if cuda else "cpu")
    settings = REDUCED if args.reduced else FULL
    report = Report(args.out, {
        "benchmark": "gpu_scale",
        "command": "python benchmarks/gpu_scale.py " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "reduced": args.reduced,
        "settings": {k: getattr(args, k) for k in ("steps", "repeats", "builder_samples", "shard_size", "micro_batch",
                                                   "distill_batches", "weight_scale", "seed")}
                    | {"text_tokens": settings["text_tokens"]},
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()},
        "families": {},
    })
    import ray

    started = time.perf_counter()
    start_ray()
    try:
        for family in args.families:
            measure_family(family, args, settings, device, report)
    finally:
        ray.shutdown()
    report.data["all_finite"] = all(r["finite"] for f in report.data["families"].values()
                                    for r in f["resolutions"].values())
    report.data["elapsed_s"] = time.perf_counter() - started
    report.save()
    table = render_markdown(report.data)
    args.out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
