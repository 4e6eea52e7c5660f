"""Any NFE on the embedded digits teacher: students trained for 2, 3 and 4 segments from ONE 50-step
dataset (boundaries of NFE 3 and 4 fall between recorded steps), and the 2-segment student sampled
in 3 and 4 segments on the teacher's schedule (what `arcflow sample --adapter RUN --nfe N` does).

    .venv/bin/python benchmarks/nfe_transfer.py            # ~15 min on 2 CPU cores
    .venv/bin/python benchmarks/nfe_transfer.py --quick    # seconds: a smoke test

Every student: the same data, steps, batch, learning rate and seed (the CLI's default student).
Scores on held-out noise: PSNR against the teacher's 50-step sample from the same noise, and the
Frechet distance to the teacher's samples from other noise (digits classifier features); the
teacher's own N-step Euler sampler is the reference row for each N. Writes
benchmarks/results/nfe_transfer.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

RESULTS = Path(__file__).parent / "results"


def make_dataset(path: Path, samples: int, seed: int) -> str:
    from arcflow.pipeline.generate import generate_trajectories
    from arcflow.pipeline.generation_config import GenerationConfig

    config = GenerationConfig(out=str(path), teacher="digits", num_samples=samples, shard_size=max(16, samples // 4),
                              seed=seed, resume=path.exists())
    generate_trajectories(config, progress=False)
    return str(path)


def train(dataset: str, out: Path, nfe: int, iters: int, batch: int) -> Path:
    """One student trained in this process by the loop each Ray Train worker runs."""
    from arcflow.distill.config import DistillConfig
    from arcflow.distill.run_plan import DISTILL_CONFIG_FILE, plan_run
    from arcflow.distill.worker import train_worker

    shutil.rmtree(out, ignore_errors=True)
    config = DistillConfig.from_dict(dict(dataset=dataset, out=str(out), nfe=nfe, iters=iters, batch_size=batch,
                                          checkpoint_every=iters, progress=False))
    plan = plan_run(config)
    out.mkdir(parents=True)
    (out / DISTILL_CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))
    train_worker(config, plan)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="benchmarks/.nfe_transfer", help="dataset and runs go here")
    parser.add_argument("--samples", type=int, default=2000, help="trajectories in the dataset")
    parser.add_argument("--iters", type=int, default=800)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--eval-samples", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is robust on a shared 2-core box)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke-test sizes")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.iters, args.batch, args.eval_samples = 64, 4, 16, 20
    import torch

    from arcflow.core.ray_runtime import ray_session
    from arcflow.distill.evaluate import heldout_seeds
    from arcflow.distill.metrics import frechet_distance
    from arcflow.distill.runs import load_run
    from arcflow.pipeline.classifier import load_digits_classifier
    from arcflow.pipeline.recording import sample_teacher
    from arcflow.pipeline.registry import load_teacher

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    started = time.perf_counter()
    with ray_session():
        dataset = make_dataset(work / "data", args.samples, seed=0)
    runs, train_seconds = {}, {}
    for nfe in (2, 3, 4):
        t0 = time.perf_counter()
        runs[nfe] = train(dataset, work / f"nfe{nfe}", nfe, args.iters, args.batch)
        train_seconds[nfe] = time.perf_counter() - t0
        print(f"trained the NFE {nfe} student in {train_seconds[nfe]:.0f}s", flush=True)

    teacher = load_teacher("digits")
    classifier = load_digits_classifier()
    prompts_all = teacher.prompt_set()
    prompts = [prompts_all[i % len(prompts_all)] for i in range(args.eval_samples)]
    seeds, other = heldout_seeds(args.eval_samples, 0), heldout_seeds(args.eval_samples, 1)
    with torch.inference_mode():
        reference = teacher.decode(sample_teacher(teacher, prompts, seeds, 50))
        other_feats = classifier.features(teacher.decode(sample_teacher(teacher, prompts, other, 50)))

    def score(images) -> dict:
        mse = ((images - reference) ** 2).flatten(1).mean(1).clamp_min(1e-12)
        return {"psnr": float((10 * torch.log10(1.0 / mse)).mean()),
                "fd_teacher": frechet_distance(classifier.features(images), other_feats)}

    rows = []
    for nfe in (2, 3, 4):
        with torch.inference_mode():
            euler = teacher.decode(sample_teacher(teacher, prompts, seeds, nfe))
        rows.append({"sampler": f"teacher {nfe}-step Euler", "trained_nfe": None, "nfe": nfe, **score(euler)})
    for trained, run in runs.items():
        loaded = load_run(run)
        for nfe in ((2, 3, 4) if trained == 2 else (trained,)):
            with torch.inference_mode():
                images = teacher.decode(loaded.sample_latents(prompts, seeds, nfe=nfe))
            rows.append({"sampler": f"student trained for NFE {trained}", "trained_nfe": trained, "nfe": nfe, **score(images)})
    result = {"samples": args.samples, "steps": 50, "iters": args.iters, "batch": args.batch,
              "eval_samples": args.eval_samples, "train_seconds": train_seconds, "rows": rows,
              "seconds": time.perf_counter() - started, "quick": args.quick}
    text = render(result)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "nfe_transfer.json").write_text(json.dumps(result, indent=2))
        (RESULTS / "nfe_transfer.md").write_text(text)
    print(text)


def render(result: dict) -> str:
    """The markdown table of a result (rows sorted by sampling NFE)."""
    lines = [
        f"Digits teacher, {result['samples']} trajectories of {result['steps']} steps, {result['iters']} steps of "
        f"batch {result['batch']} per student (the CLI's default student, seed 0), {result['eval_samples']} held-out "
        "noises; PSNR vs the teacher's 50-step sample from the same noise.",
        "",
        "| sampled in | sampler | PSNR vs teacher (dB) | FD vs teacher |",
        "|---:|---|---:|---:|",
    ]
    for row in sorted(result["rows"], key=lambda r: (r["nfe"], r["trained_nfe"] or 0)):
        lines.append(f"| {row['nfe']} | {row['sampler']} | {row['psnr']:.2f} | {row['fd_teacher']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
