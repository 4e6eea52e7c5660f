"""``arcflow train-teacher`` and ``arcflow sample``: teachers and students from the shell."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import typer

from arcflow.core.errors import MAX_SEED, ArcflowError, check_finite, quote, refuse_overwrite

if TYPE_CHECKING:  # torch loads lazily so that `arcflow --help` stays fast
    from torch import Tensor

    from arcflow.pipeline.teacher import Teacher

def _load_teacher(name: str) -> Teacher:
    """Resolve ``--teacher`` (the embedded ``digits``, a hub id or a pipeline directory)."""
    from arcflow.pipeline.registry import check_teacher_id, load_teacher

    check_teacher_id(name)
    return load_teacher(name)


def _teacher_images(
    teacher_name: str, prompts: list[str], num: int, seed: int, steps: int, guidance: Optional[float]
) -> tuple[Tensor, Optional[int]]:
    """Sample ``num`` images per prompt with the teacher; returns images and the grid row length."""
    from arcflow.pipeline.recording import sample_teacher
    from arcflow.pipeline.registry import require_prompts

    require_prompts(teacher_name, bool(prompts), "--prompt")
    teacher = _load_teacher(teacher_name)
    prompts = prompts or teacher.prompt_set()
    teacher.validate_prompts(prompts)
    batch = [p for p in prompts for _ in range(num)]
    seeds = [seed + i for i in range(len(batch))]
    latents = sample_teacher(teacher, batch, seeds, steps, guidance, progress=True)
    return teacher.decode(latents), (num if len(prompts) > 1 else None)


def sample(
    out: Path = typer.Option(..., "--out", help="Output file: .png writes a grid, .npy writes [N, H, W] floats in [0, 1]."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="A distill run directory: sample the few-step student."),
    teacher: str = typer.Option("digits", "--teacher", help="Teacher to sample from (ignored with --adapter)."),
    prompt: Optional[List[str]] = typer.Option(
        None, "--prompt", help="Prompt (repeatable); default: the teacher's own prompt set."
    ),
    steps: int = typer.Option(50, "--steps", min=1, max=10_000, help="Euler steps of the teacher sampler."),
    nfe: Optional[int] = typer.Option(
        None, "--nfe", min=1, max=1000, help="Student network evaluations (default: the run's; another NFE samples on the teacher's schedule and, measured on digits, loses quality: train for it with distill --nfe)."
    ),
    compare_teacher: bool = typer.Option(
        False, "--compare-teacher", help="With --adapter: add the teacher's --steps sample from the same noise."
    ),
    num: int = typer.Option(8, "--num", min=1, max=100_000, help="Samples per prompt."),
    seed: int = typer.Option(0, "--seed", min=0, max=MAX_SEED, help="Sample i uses seed + i."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Teacher CFG scale (default: the teacher's)."),
    image: Optional[List[Path]] = typer.Option(
        None, "--image", help="Reference image for edit pipelines (repeatable: several references per prompt); needs --prompt."
    ),
) -> None:
    """Generate images with a teacher or a distilled student; write a PNG grid or a .npy array."""
    from arcflow.pipeline.images import check_image_path, write_images

    from arcflow.pipeline.edit_inputs import check_prompt_length

    check_image_path(out)
    check_finite("--guidance", guidance, minimum=0.0)
    for text in prompt or []:
        check_prompt_length(text, "--prompt")
    prompts = _with_images(list(prompt or []), list(image or []))
    if adapter is None:
        if compare_teacher or nfe is not None:
            raise ArcflowError("--compare-teacher and --nfe need --adapter RUN")
        images, nrow = _teacher_images(teacher, prompts, num, seed, steps, guidance)
    else:
        images, nrow = _student_images(adapter, prompts, num, seed, nfe, compare_teacher, steps, guidance)
    path = write_images(images, out, nrow)
    typer.echo(f"wrote {len(images)} images to {path}")


def _with_images(prompts: list[str], images: list[Path]) -> list[str]:
    """Each prompt with the reference images (checked to open), as edit prompts; without images,
    plain-text prompts (one that reads as an edit prompt is refused)."""
    from arcflow.pipeline.edit_inputs import check_image, check_image_name, edit_prompt, plain_prompt

    if not images:
        return [plain_prompt(p, f"--prompt {quote(p)}") for p in prompts]

    if not prompts:
        raise ArcflowError("--image needs --prompt (the edit instruction)")
    for p in images:
        check_image_name(str(p))
    paths = [str(p.resolve()) for p in images]
    for p in paths:
        check_image(p)
    return [edit_prompt(p, paths) for p in prompts]


def _student_images(
    run: Path, prompts: list[str], num: int, seed: int, nfe: Optional[int], compare: bool, steps: int,
    guidance: Optional[float],
) -> tuple[Tensor, Optional[int]]:
    """Student samples (and, with ``compare``, the teacher's from the same noise below them)."""
    import torch

    from arcflow.distill.runs import load_run, load_run_teacher
    from arcflow.pipeline.recording import sample_teacher

    _, teacher = load_run_teacher(run)
    prompts = prompts or teacher.prompt_set()
    teacher.validate_prompts(prompts)  # before the student is built: bad input fails fast, quietly
    loaded = load_run(run, teacher=teacher)
    batch = [p for p in prompts for _ in range(num)]
    seeds = [seed + i for i in range(len(batch))]
    images = teacher.decode(loaded.sample_latents(batch, seeds, nfe))
    if not compare:
        return images, (num if len(prompts) > 1 else None)
    reference = teacher.decode(sample_teacher(teacher, batch, seeds, steps, guidance, progress=True))
    return torch.cat([images, reference]), len(batch)


def train_teacher(
    out: Path = typer.Option(..., "--out", help="Directory for the teacher and classifier weights."),
    seed: int = typer.Option(0, "--seed", min=0, max=MAX_SEED, help="Seed of every random draw in training."),
    iters: Optional[int] = typer.Option(
        None, "--iters", min=1, max=10_000_000, help="Teacher training iterations (default: the shipped recipe)."
    ),
    classifier_epochs: Optional[int] = typer.Option(
        None, "--classifier-epochs", min=1, max=100_000, help="Classifier training epochs."
    ),
    threads: Optional[int] = typer.Option(
        None, "--threads", min=1, max=1024, help="Torch intra-op threads (fixed for reproducibility)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier teacher in --out."),
) -> None:
    """Retrain the embedded digits teacher and its evaluation classifier, deterministically."""
    from arcflow.pipeline import digits_training as training

    iters = training.DEFAULT_ITERS if iters is None else iters
    epochs = training.CLASSIFIER_EPOCHS if classifier_epochs is None else classifier_epochs
    threads = training.DEFAULT_THREADS if threads is None else threads
    refuse_overwrite(out, training.OUTPUT_FILES, overwrite)
    summary = training.train_digits(out, seed=seed, iters=iters, classifier_epochs=epochs, threads=threads)
    typer.echo(
        f"wrote teacher + classifier to {out} in {summary['total_seconds']:.0f}s "
        f"(classifier held-out accuracy {summary['classifier_heldout_accuracy']:.3f})"
    )
