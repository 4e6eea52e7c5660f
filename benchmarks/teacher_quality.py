"""Quality of the embedded digits teacher: accuracy, Frechet distances, trajectory curvature.

    .venv/bin/python benchmarks/teacher_quality.py

Samples ``--num`` images (all ten digits equally, default guidance, 50 Euler steps x 2 CFG
evaluations), classifies them with the shipped classifier, and compares classifier features with
held-out real digits. Prints tables and writes ``benchmarks/results/teacher_quality.json`` and a
10 x 10 grid (one row per digit) to ``docs/teacher_grid.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import torch

from arcflow.distill.metrics import frechet_distance, velocity_cosines
from arcflow.pipeline.classifier import load_digits_classifier
from arcflow.pipeline.digits import load_digits_teacher
from arcflow.pipeline.digits_data import digits_split
from arcflow.pipeline.digits_prompts import PROMPTS
from arcflow.pipeline.images import save_grid
from arcflow.pipeline.recording import record_trajectories, sample_teacher

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=None, help="weights dir (default: shipped)")
    parser.add_argument("--num", type=int, default=1000, help="samples (a multiple of 10)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=None, help="default: the teacher's")
    parser.add_argument("--seed", type=int, default=1_000_000, help="first per-sample seed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/teacher_quality.json")
    parser.add_argument("--grid", type=Path, default=ROOT / "docs/teacher_grid.png")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    teacher = load_digits_teacher(args.weights)
    classifier = load_digits_classifier(args.weights)
    guidance = teacher.default_guidance if args.guidance is None else args.guidance
    per_digit = args.num // 10
    digits = torch.arange(10).repeat_interleave(per_digit)
    prompts = [PROMPTS[d] for d in digits.tolist()]
    seeds = [args.seed + i for i in range(len(prompts))]

    start = time.perf_counter()
    x, u, sigmas = record_trajectories(
        teacher, teacher.encode_prompts(prompts), teacher.noise(seeds), args.steps, guidance, progress=True
    )
    seconds = time.perf_counter() - start
    images = teacher.decode(x[:, -1])
    few = teacher.decode(sample_teacher(teacher, prompts, seeds, 2, guidance))

    split = digits_split()
    held = classifier.features(split.heldout_images)
    accuracy = (classifier.predict(images) == digits).float().mean().item()
    accuracy_few = (classifier.predict(few) == digits).float().mean().item()
    per_digit_acc = [(classifier.predict(images[digits == d]) == d).float().mean().item() for d in range(10)]
    fd = {
        f"teacher_{args.steps}x2_vs_heldout": frechet_distance(classifier.features(images), held),
        "real_train_vs_heldout (floor)": frechet_distance(classifier.features(split.train_images), held),
        "teacher_2_steps_vs_heldout": frechet_distance(classifier.features(few), held),
    }
    cos = velocity_cosines(u).mean(0)
    lowest = int(cos.argmin()) + 1

    print(f"\ndigits teacher {teacher.revision}  guidance {guidance}  {args.num} samples  "
          f"{args.steps} steps x 2 evaluations  ({seconds:.1f}s)")
    print(f"{'metric':40s} value")
    print(f"{f'accuracy (prompted digit), {args.steps} steps':40s} {accuracy:.4f}")
    print(f"{'accuracy (prompted digit), 2 steps':40s} {accuracy_few:.4f}")
    print("per-digit accuracy: " + " ".join(f"{d}:{a:.2f}" for d, a in enumerate(per_digit_acc)))
    for name, value in fd.items():
        print(f"{'FD ' + name:40s} {value:.3f}")
    print("\ncosine(u_j, u_{j-1}) averaged over samples (1 = straight)")
    print(f"{'step j':>6s} {'sigma_j':>8s} {'cos':>8s}")
    for j in range(1, args.steps):
        print(f"{j:6d} {sigmas[j].item():8.3f} {cos[j - 1].item():8.4f}")
    print(f"lowest cosine at step {lowest} (sigma {sigmas[lowest].item():.2f}): {cos.min().item():.4f}")

    grid = torch.stack([images[digits == d][:10] for d in range(10)]).flatten(0, 1)
    save_grid(grid, args.grid, nrow=10)
    result = {
        "teacher_revision": teacher.revision,
        "guidance": guidance,
        "num_samples": len(prompts),
        "steps": args.steps,
        "first_seed": args.seed,
        "accuracy": accuracy,
        "accuracy_2_steps": accuracy_few,
        "per_digit_accuracy": per_digit_acc,
        "frechet_distance": fd,
        "velocity_cosine_per_step": {str(j): cos[j - 1].item() for j in range(1, args.steps)},
        "lowest_cosine_step": lowest,
        "sampling_seconds": seconds,
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json} and {args.grid}")


if __name__ == "__main__":
    main()
