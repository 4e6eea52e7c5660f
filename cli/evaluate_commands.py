"""`arcflow evaluate`: students vs the teacher on the embedded digits model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def evaluate_command(
    adapter: list[Path] = typer.Option(..., "--adapter", help="A student run directory (repeat for several)."),
    out: Path = typer.Option(..., "--out", help="Report directory: report.json, report.md, grid.png."),
    num_samples: int = typer.Option(1000, "--num-samples", "-n", help="Held-out noise seeds (cycled over the ten digits)."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Teacher CFG scale (default: the teacher's)."),
    teacher_steps: int = typer.Option(50, "--teacher-steps", help="Steps of the reference teacher sampler."),
    seed: int = typer.Option(0, "--seed", help="Selects the held-out noise seeds."),
    speed_batch: int = typer.Option(100, "--speed-batch", help="Batch size of the wall-time measurement."),
    speed_repeats: int = typer.Option(3, "--speed-repeats", help="Timed repeats per row (the best one counts)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier report in --out."),
) -> None:
    """Measure students against the teacher: Frechet distance, accuracy, PSNR, diversity, speed-up."""
    from arcflow.distill.evaluate import EvaluationConfig, evaluate

    config = EvaluationConfig(
        adapters=[str(a) for a in adapter], out=str(out), num_samples=num_samples, guidance=guidance,
        teacher_steps=teacher_steps, seed=seed, speed_batch=speed_batch, speed_repeats=speed_repeats, overwrite=overwrite,
    )
    report = evaluate(config, progress=progress)
    typer.echo((out / "report.md").read_text().rstrip())
    typer.echo(f"grid: {out / 'grid.png'} (rows: {', '.join(report['grid_rows'])})")
