"""FLUX-shaped real trajectories for the storage benchmarks, made once and cached.

    .venv/bin/python benchmarks/flux_shaped_data.py                # build (or reuse) the cache
    .venv/bin/python benchmarks/flux_shaped_data.py --probe        # time ONE trajectory, write nothing
    .venv/bin/python benchmarks/flux_shaped_data.py -n 24 --threads 2

A tiny, randomly initialized ``FluxPipeline`` whose every STORED array has FLUX.1-dev's shape:
VAE scale 8 with 16 latent channels, so 1024x1024 images are 128x128x16 latents = 4096 packed
tokens x 64 channels; a T5 encoder of width 4096 (``prompt_embeds`` 512 x 4096) and a CLIP of width
768 (``pooled_prompt_embeds`` 768); embedded guidance as FLUX.1-dev. Everything else is tiny (1 + 1
transformer blocks of 2 heads x 8, 2-layer text encoders, word-level tokenizers from
tests/tiny_pipelines.py), so a 50-step trajectory costs seconds on a CPU. The weights are random:
the trajectories have the right shapes and come from arcflow's own generator (``DiffusersTeacher``,
the pipeline's own ``__call__``, the Ray builder, the v1 writer), but their content is not FLUX's, so
compression ratios measured on them say little about real FLUX latents (see the report of
benchmarks/storage_bytes.py); I/O volumes and shapes are what they are for.

The dataset is generated through ``generate_trajectories`` (the code path of
``arcflow generate-trajectories --teacher DIR --height 1024 --width 1024 --steps 50 --dtype float32``)
into ``benchmarks/.cache/flux_shaped/`` (gitignored):

- ``pipeline/``     the saved tiny pipeline (``save_pretrained``), rebuilt only when missing;
- ``prompts.txt``   ``--prompts`` file: each of 6 prompts on ``--seeds-per-prompt`` consecutive lines
                    (the generator cycles the file over sample indices and seeds each sample by its
                    index, so a prompt's samples are consecutive and mostly share a shard);
- ``dataset_f32/``  the float32 trajectory dataset (format of the code that generated it: today v1);
- ``generation.json`` settings and timing of the run that completed the dataset.

A rerun with the same settings reuses a complete dataset and resumes an incomplete one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".cache" / "flux_shaped"
HEIGHT = WIDTH = 1024
STEPS = 50
PROMPTS = (
    "a photo of a red cat",
    "a painting of a blue house on the mountain",
    "a sketch of a small dog",
    "a big green tree and the river",
    "a photo of a car in the sky",
    "a painting of a mountain with a house",
)
SEEDS_PER_PROMPT = 4
#: FLUX.1-dev's stored shapes: T5 width and length, CLIP pooled width, latent channels.
T5_DIM, T5_LENGTH, CLIP_DIM, LATENT_CHANNELS = 4096, 512, 768, 16


def _tests_helpers():
    """tests/tiny_pipelines.py's offline tokenizers and FLUX scheduler config (no duplicate here)."""
    tests = str(Path(__file__).resolve().parent.parent / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import tiny_pipelines

    return tiny_pipelines


def flux_shaped_pipeline(seed: int = 0):
    """The tiny FLUX-shaped ``FluxPipeline`` (see the module docstring)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tp = _tests_helpers()
    vocab = len(tp.WORDS) + 4
    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab, hidden_size=CLIP_DIM, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=77, projection_dim=CLIP_DIM, bos_token_id=2, eos_token_id=2, pad_token_id=0,
    ))
    torch.manual_seed(seed + 1)
    t5 = T5EncoderModel(T5Config(
        vocab_size=vocab, d_model=T5_DIM, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=3,
    ))
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(  # 4 levels: VAE scale 8, as FLUX's
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        latent_channels=LATENT_CHANNELS, norm_num_groups=8, sample_size=HEIGHT,
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
    )
    torch.manual_seed(seed + 3)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, out_channels=None, num_layers=1, num_single_layers=1,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=T5_DIM, pooled_projection_dim=CLIP_DIM,
        guidance_embeds=True, axes_dims_rope=(2, 2, 4),
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**tp.FLUX_SCHEDULER_CONFIG),
        vae=vae.eval(), text_encoder=clip.eval(), tokenizer=tp.word_tokenizer(77, bos_eos=True),
        text_encoder_2=t5.eval(), tokenizer_2=tp.word_tokenizer(T5_LENGTH, bos_eos=False),
        transformer=transformer.eval(),
    )


def ensure_pipeline(cache: Path = CACHE) -> Path:
    directory = cache / "pipeline"
    if not (directory / "model_index.json").is_file():
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache / ".pipeline.tmp"
        flux_shaped_pipeline().save_pretrained(str(tmp))
        os.replace(tmp, directory)
    return directory


def write_prompts(path: Path, seeds_per_prompt: int) -> Path:
    lines = [p for p in PROMPTS for _ in range(seeds_per_prompt)]
    text = "\n".join(lines) + "\n"
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return path


def probe(cache: Path, threads: int | None, batch: int = 1) -> dict:
    """Seconds for ``batch`` trajectories (50 steps, 1024px) in this process, nothing written."""
    import torch

    from arcflow.pipeline.recording import record_trajectories
    from arcflow.pipeline.registry import load_teacher

    if threads:
        torch.set_num_threads(threads)
    teacher = load_teacher(str(ensure_pipeline(cache)), height=HEIGHT, width=WIDTH)
    t0 = time.perf_counter()
    cond = teacher.encode_prompts(list(PROMPTS[:1]) * batch)
    noise = teacher.noise(list(range(batch)))
    t1 = time.perf_counter()
    x, u, sigmas = record_trajectories(teacher, cond, noise, steps=STEPS, micro_batch=batch)
    t2 = time.perf_counter()
    return {"latent_shape": list(teacher.latent_shape), "cond_shapes": {k: list(v.shape[1:]) for k, v in cond.items()},
            "batch": batch, "threads": torch.get_num_threads(), "encode_s": t1 - t0, "sample_s": t2 - t1,
            "s_per_trajectory": (t2 - t1) / batch, "x_abs_max": float(x.abs().max()), "u_abs_max": float(u.abs().max()),
            "u_rms": float(u.pow(2).mean().sqrt())}


def ensure_dataset(
    cache: Path = CACHE, num_samples: int | None = None, shard_size: int = 8, seeds_per_prompt: int = SEEDS_PER_PROMPT,
    threads: int | None = None, batch_size: int = 4, progress: bool = True,
) -> Path:
    """The cached float32 FLUX-shaped dataset (generated or resumed when incomplete); returns its path."""
    from arcflow.pipeline.generate import generate_trajectories
    from arcflow.pipeline.generation_config import GenerationConfig
    from arcflow.storage import open_dataset

    num_samples = num_samples or len(PROMPTS) * seeds_per_prompt
    out = cache / "dataset_f32"
    pipe = ensure_pipeline(cache)
    prompts = write_prompts(cache / "prompts.txt", seeds_per_prompt)
    if (out / "dataset.json").is_file():
        r = open_dataset(str(out))
        if r.spec.num_samples == num_samples and len(r.committed_shards()) == r.spec.num_shards:
            return out
    config = GenerationConfig(
        out=str(out), teacher=str(pipe), num_samples=num_samples, prompts_file=str(prompts), steps=STEPS,
        shard_size=shard_size, seed=0, batch_size=batch_size, dtype="float32", compress=True, threads=threads,
        resume=(out / "dataset.json").is_file(), teacher_options={"height": HEIGHT, "width": WIDTH},
    )
    t0 = time.perf_counter()
    summary = generate_trajectories(config, progress=progress)
    seconds = time.perf_counter() - t0
    record = {
        "command_equivalent": (f"arcflow generate-trajectories --teacher {pipe} --height {HEIGHT} --width {WIDTH} "
                               f"--steps {STEPS} --dtype float32 -n {num_samples} --shard-size {shard_size} "
                               f"--batch-size {batch_size} --prompts {prompts} --out {out}"
                               + (f" --threads {threads}" if threads else "")),
        "summary": summary.to_dict(), "wall_s_including_ray_start": seconds,
        "s_per_trajectory_compute": summary.compute_seconds / max(1, summary.num_samples - summary.shards_skipped * shard_size),
        "s_per_trajectory_wall": summary.seconds / max(1, summary.num_samples - summary.shards_skipped * shard_size),
        "threads": threads, "cpus": os.cpu_count(), "load_avg": os.getloadavg(), "machine": platform.machine(),
    }
    (cache / "generation.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("-n", "--num-samples", type=int, default=None,
                    help=f"trajectories (default: {len(PROMPTS)} prompts x --seeds-per-prompt)")
    ap.add_argument("--seeds-per-prompt", type=int, default=SEEDS_PER_PROMPT)
    ap.add_argument("--shard-size", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4, help="teacher micro-batch (a shard is padded to a multiple)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the generation worker")
    ap.add_argument("--probe", type=int, nargs="?", const=1, default=None, metavar="BATCH",
                    help="only time BATCH (default 1) trajectories in this process; prints JSON")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.probe:
        print(json.dumps(probe(args.cache, args.threads, args.probe), indent=2))
        return 0
    out = ensure_dataset(args.cache, args.num_samples, args.shard_size, args.seeds_per_prompt, args.threads,
                         args.batch_size, progress=not args.no_progress)
    gen = args.cache / "generation.json"
    print(f"dataset: {out}")
    if gen.is_file():
        print(gen.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
