"""`arcflow generate-trajectories`, `arcflow inspect` and `arcflow verify`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import List, Optional

import typer

from arcflow.storage.format import DEFAULT_KEYFRAME_EVERY, STORAGE_DTYPES
from arcflow.core.errors import ArcflowError, quote

log = logging.getLogger(__name__)


def generate_trajectories_command(
    out: str = typer.Option(..., "--out", help="Dataset directory or fsspec URL (file://, s3://, gs://; not memory://, which dies with its worker)."),
    teacher: str = typer.Option("digits", "--teacher", help="Teacher id: 'digits' (embedded), a diffusers hub id (black-forest-labs/FLUX.1-dev, Qwen/Qwen-Image) or a local pipeline directory."),
    num_samples: int = typer.Option(..., "--num-samples", "-n", help="Number of trajectories N."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Text file, one prompt per line (cycled over N), or JSON Lines (.jsonl) for edit pipelines: {\"prompt\": ..., \"image\": path or [paths]}. Default: the teacher's own prompts."),
    steps: int = typer.Option(50, "--steps", help="Teacher Euler steps per trajectory."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="CFG scale (default: the teacher's)."),
    shard_size: int = typer.Option(256, "--shard-size", help="Trajectories per shard (the unit of work and of commit)."),
    seed: int = typer.Option(0, "--seed", help="Job seed; per-sample noise seeds derive from (seed, sample index)."),
    workers: int = typer.Option(1, "--workers", help="Ray actors, each holding one teacher (one GPU each on a cluster)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch intra-op threads per worker (default: one per CPU of the worker; shard writes overlap compute)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Join this Ray cluster instead of starting a local one."),
    dtype: str = typer.Option("float16", "--dtype", help=f"Storage dtype: {'|'.join(STORAGE_DTYPES)} (float8_e4m3: 8-bit velocities with a scale per step, 16-bit states)."),
    seeds_per_prompt: int = typer.Option(1, "--seeds-per-prompt", help="Consecutive samples (noise seeds) per prompt before the next prompt; their conditioning is stored once per shard."),
    keyframe_every: int = typer.Option(DEFAULT_KEYFRAME_EVERY, "--keyframe-every", help="Store the state every K steps (and the last); the others are rebuilt from the velocities. 1 stores every state."),
    batch_size: int = typer.Option(256, "--batch-size", help="Trajectories per teacher forward batch."),
    no_compress: bool = typer.Option(False, "--no-compress", help="Store chunks uncompressed (default: zstd through blosc with byte shuffle)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted job with the same configuration."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a live progress bar."),
    height: Optional[int] = typer.Option(None, "--height", min=16, max=16_384, help="Image height in pixels (diffusers teachers; default: the pipeline's, 1024)."),
    width: Optional[int] = typer.Option(None, "--width", min=16, max=16_384, help="Image width in pixels (diffusers teachers; default: the pipeline's, 1024)."),
    torch_dtype: Optional[str] = typer.Option(None, "--torch-dtype", help="Teacher weights dtype: bfloat16|float16|float32 (diffusers teachers)."),
    device: Optional[str] = typer.Option(None, "--device", help="Torch device for the teacher (default: cuda when the worker has a GPU, else cpu)."),
    call_option: Optional[List[str]] = typer.Option(
        None, "--call-option", help="KEY=VALUE (repeatable): a further argument of the pipeline's __call__ on every call, VALUE as JSON (e.g. text_encoder_out_layers=[1]); diffusers teachers."
    ),
) -> None:
    """Run the teacher sampler on Ray and write (x_t, t, velocity) trajectories as Zarr + Parquet shards."""
    from arcflow.pipeline.generate import generate_trajectories
    from arcflow.pipeline.generation_config import GenerationConfig

    teacher_options = _teacher_options(teacher, height=height, width=width, torch_dtype=torch_dtype, device=device,
                                       call_options=parse_call_options(call_option))
    config = GenerationConfig(
        out=out,
        teacher=teacher,
        num_samples=num_samples,
        prompts_file=str(prompts) if prompts is not None else None,
        steps=steps,
        guidance=guidance,
        shard_size=shard_size,
        seed=seed,
        batch_size=batch_size,
        dtype=dtype,
        keyframe_every=keyframe_every,
        seeds_per_prompt=seeds_per_prompt,
        compress=not no_compress,
        workers=workers,
        threads=threads,
        ray_address=ray_address,
        resume=resume,
        teacher_options=teacher_options,
    )
    summary = generate_trajectories(config, progress=progress)
    typer.echo(
        f"{summary.num_samples} trajectories in {summary.shards_total} shards at {out} "
        f"({summary.shards_written} written, {summary.shards_skipped} already committed; "
        f"{summary.samples_per_second:.1f} samples/s)"
    )


def parse_call_options(values: Optional[List[str]]) -> Optional[dict]:
    """``--call-option KEY=VALUE`` flags as a dict (VALUE parsed as JSON, else kept as a string)."""
    if not values:
        return None
    options: dict = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ArcflowError(f"--call-option expects KEY=VALUE, got {quote(item)}")
        try:
            options[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            options[key.strip()] = raw
    return options


def _teacher_options(teacher: str, **given: object) -> dict:
    """The non-None options, as ``GenerationConfig.teacher_options``; diffusers-only ones are refused
    for embedded teachers."""
    from arcflow.pipeline.registry import check_teacher_options

    options = {k: v for k, v in given.items() if v is not None}
    check_teacher_options(teacher, options)
    if "torch_dtype" in options:
        from arcflow.pipeline.diffusers_teachers import resolve_torch_dtype

        resolve_torch_dtype(options["torch_dtype"])  # one-line error for an unknown name
    return options


def inspect_command(
    dataset: str = typer.Argument(..., help="Dataset directory or fsspec URL."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    sample: Optional[int] = typer.Option(None, "--sample", help="A sample id to render (with --png)."),
    png: Optional[Path] = typer.Option(None, "--png", help="Write the --sample trajectory's states as a PNG strip."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher used to decode latents for --png (default: the dataset's)."),
) -> None:
    """Summarize a trajectory dataset: samples, shards, bytes, and the per-step curvature table."""
    from arcflow.storage.reader import open_dataset
    from arcflow.storage.summary import dataset_summary, format_summary

    if (sample is None) != (png is None):
        raise ArcflowError("--sample and --png go together: --sample ID --png out.png")
    if png is not None:
        from arcflow.pipeline.images import check_writable_file

        if png.suffix.lower() != ".png":
            raise ArcflowError(f"--png must end in .png, got {png}")
        check_writable_file(png)
    reader = open_dataset(dataset)
    if sample is not None:
        _render_strip(reader, sample, png, teacher or reader.spec.teacher_id)
        typer.echo(f"wrote {png}")
        return
    summary = dataset_summary(reader)
    typer.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))


def _render_strip(reader, sample_id: int, png: Path, teacher_id: str) -> None:
    import torch

    from arcflow.pipeline.images import save_grid
    from arcflow.pipeline.registry import load_teacher

    record = reader.read_sample(sample_id)
    from arcflow.pipeline.registry import teacher_options_for_dataset

    options = teacher_options_for_dataset(reader.spec) if teacher_id == reader.spec.teacher_id else {}
    teacher = load_teacher(teacher_id, **options)
    states = torch.from_numpy(record["x"])  # [S+1, *latent]
    pick = torch.linspace(0, states.shape[0] - 1, min(11, states.shape[0])).round().long()
    images = teacher.decode(states[pick])
    save_grid(images, png, nrow=len(pick))


def verify_command(
    dataset: str = typer.Argument(..., help="Dataset directory or fsspec URL."),
    repair: bool = typer.Option(False, "--repair", help="Uncommit the damaged shards (remove their index part) so that generate-trajectories --resume regenerates exactly those."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Read every chunk of every committed shard (checksums, missing chunks, the chunk manifest) and
    cross-check its index part and array metadata against its arrays and dataset.json; report the
    damaged shards, one line each. Exit 1 when damage is found and not repaired."""
    from arcflow.storage.verify import verify_dataset

    report = verify_dataset(dataset, repair=repair, progress=progress)
    for problem in ([report.header] if report.header else report.problems.values()):
        typer.echo(problem)
    typer.echo(report.summary_line())
    if report.header or (report.problems and not repair):
        raise typer.Exit(1)
