"""Storage, GPU memory and (estimated) time for trajectory datasets of FLUX.1-dev and Qwen-Image.

    .venv/bin/python benchmarks/storage_estimate.py                       # 1024x1024, 50 steps
    .venv/bin/python benchmarks/storage_estimate.py --size 512 --steps 28 --keyframe-every 4
    .venv/bin/python benchmarks/storage_estimate.py --flux-s-per-nfe 0.3 --qwen-s-per-nfe 0.5

Bytes come from the packed latent shape (tokens x channels: 1024x1024 -> 64x64 tokens of 64
channels for both families) and the dataset format, uncompressed:

- format v1: S+1 states ``x`` and S velocities ``u`` per trajectory in the storage dtype, and the
  conditioning once per SAMPLE;
- format v2: S velocities ``u`` in the storage dtype (``float8_e4m3``: 1 byte plus a float32 scale
  per step), the states at the keyframes only (step 0, every K-th, the last; 16-bit, or float32 for
  float32 storage), and the conditioning once per PROMPT, i.e. divided by the seeds per prompt.

Conditioning: FLUX T5 512x4096 + pooled 768; Qwen-Image 512x3584 embeddings + 512 mask at the
teacher's default ``max_sequence_length``. Parameter counts of the transformers (and T5-XXL) come
from instantiating the real configs on the meta device.

Compression is measured on a small random example (Gaussian states, as noisy latents are): zstd
through blosc with byte shuffle, as the dataset writer uses.

Time per trajectory is an ESTIMATE: network evaluations (FLUX.1-dev: S x 1, embedded guidance;
Qwen-Image: S x 2, true CFG) times an ASSUMED seconds-per-NFE (flags above). Nothing here is timed.
Prints the tables and writes benchmarks/results/storage_estimate.md and .json.
"""

from __future__ import annotations

import argparse

import numpy as np

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
#: v2 storage dtypes: (bytes per velocity value, bytes per stored state value, extra bytes per step)
V2_DTYPES = {"float32": (4, 4, 0), "float16": (2, 2, 0), "bfloat16": (2, 2, 0), "float8_e4m3": (1, 2, 4)}
GB = 1e9

FAMILIES = {
    # name: (latent channels after 2x2 packing, VAE scale, conditioning values per sample, NFE per step)
    "FLUX.1-dev": dict(channels=64, vae_scale=8, cond=512 * 4096 + 768, nfe_per_step=1,
                       cond_text="T5 512x4096 + pooled 768"),
    "Qwen-Image": dict(channels=64, vae_scale=8, cond=512 * 3584 + 512, nfe_per_step=2,
                       cond_text="Qwen2.5-VL 512x3584 + mask 512"),
}
# Assumed seconds per network evaluation at 1024x1024, batch 1, bf16 on one H100 (NOT measured).
ASSUMED_S_PER_NFE = {"FLUX.1-dev": 0.25, "Qwen-Image": 0.40}
# Text encoder sizes not instantiated here (published parameter count).
QWEN25_VL_7B_PARAMS = 8.29e9


def param_counts() -> dict[str, float]:
    """Parameters of the real transformers / T5-XXL encoder, built on the meta device (no memory)."""
    import torch
    from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    with torch.device("meta"):
        flux = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
            guidance_embeds=True, axes_dims_rope=(16, 56, 56),
        )
        qwen = QwenImageTransformer2DModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56),
        )
        t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                     num_heads=64, feed_forward_proj="gated-gelu", is_encoder_decoder=False))
    count = lambda m: float(sum(p.numel() for p in m.parameters()))  # noqa: E731
    return {"flux": count(flux), "qwen": count(qwen), "t5": count(t5)}


def compression_ratio(dtype: str, seed: int = 0) -> float:
    """Compressed / raw bytes of Gaussian latents (11 states x 4096 tokens x 64) with blosc-zstd."""
    from numcodecs import Blosc

    rng = np.random.default_rng(seed)
    a = rng.standard_normal((11, 4096, 64)).astype(np.float32)
    if dtype == "float16":
        a = a.astype(np.float16)
    elif dtype == "bfloat16":  # top 16 bits of float32, as the writer stores bfloat16
        a = (a.view(np.uint32) >> 16).astype(np.uint16)
    codec = Blosc(cname="zstd", clevel=5, shuffle=Blosc.SHUFFLE)
    return len(codec.encode(a)) / a.nbytes


def report(json_rows: list) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1024, help="image height = width in pixels")
    ap.add_argument("--steps", type=int, default=50, help="teacher Euler steps S")
    ap.add_argument("--flux-s-per-nfe", type=float, default=ASSUMED_S_PER_NFE["FLUX.1-dev"])
    ap.add_argument("--qwen-s-per-nfe", type=float, default=ASSUMED_S_PER_NFE["Qwen-Image"])
    ap.add_argument("--shard-gb", type=float, default=1.5, help="target shard size for the recommendation")
    ap.add_argument("--keyframe-every", type=int, default=5, help="format v2 keyframe interval K")
    ap.add_argument("--seeds-per-prompt", type=int, default=4, help="trajectories per prompt (v2 stores the conditioning once)")
    ap.add_argument("--no-params", action="store_true", help="skip the meta-device parameter counts")
    args = ap.parse_args()
    s_per_nfe = {"FLUX.1-dev": args.flux_s_per_nfe, "Qwen-Image": args.qwen_s_per_nfe}
    S = args.steps

    K, seeds = args.keyframe_every, args.seeds_per_prompt
    keyframes = len({*range(0, S + 1, K), S})
    rows = []
    print(f"# Trajectory storage at {args.size}x{args.size}, {S} steps, {seeds} seeds per prompt\n")
    print(f"v1: {S + 1} states + {S} velocities, conditioning per sample. v2: {S} velocities, {keyframes} keyframe "
          f"states (every {K} steps), conditioning per prompt.\n")
    print("| teacher | format | dtype | u per traj | x per traj | cond per traj | total per traj | vs v1 float16 "
          "| 100k trajectories | trajs per ~%.1f GB shard |" % args.shard_gb)
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, f in FAMILIES.items():
        tokens = (args.size // f["vae_scale"] // 2) ** 2
        latent = tokens * f["channels"]
        v1_f16 = (2 * S + 1) * latent * 2 + f["cond"] * 2
        layouts = [("v1", d, S * latent * b, (S + 1) * latent * b, f["cond"] * b) for d, b in DTYPE_BYTES.items()]
        layouts += [("v2", d, S * (latent * ub + extra), keyframes * latent * xb, f["cond"] * xb / seeds)
                    for d, (ub, xb, extra) in V2_DTYPES.items()]
        for fmt, dtype, u, x, cond in layouts:
            total = u + x + cond
            per_shard = max(1, int(args.shard_gb * GB // total))
            rows.append({"teacher": name, "format": fmt, "dtype": dtype, "u_bytes": u, "x_bytes": x, "cond_bytes": cond,
                         "total_bytes": total, "ratio_vs_v1_float16": total / v1_f16})
            print(
                f"| {name} | {fmt} | {dtype} | {u / 1e6:.1f} MB | {x / 1e6:.1f} MB | {cond / 1e6:.2f} MB | {total / 1e6:.1f} MB "
                f"| {total / v1_f16:.2f}x | {100_000 * total / 1e12:.2f} TB | {per_shard} |"
            )
    print("\nconditioning: " + "; ".join(f"{n}: {f['cond_text']}" for n, f in FAMILIES.items()))
    json_rows.extend(rows)

    print("\n# Compression (blosc zstd, byte shuffle) on Gaussian latents (measured, tiny random example)\n")
    for dtype in DTYPE_BYTES:
        r = compression_ratio(dtype)
        print(f"- {dtype}: compressed/raw = {r:.3f} ({100 * (1 - r):.1f}% saved)")

    if not args.no_params:
        p = param_counts()
        print("\n# GPU memory per generation worker (weights only, bf16 = 2 bytes/param)\n")
        print(f"- FLUX.1-dev transformer: {p['flux'] / 1e9:.2f}B params -> {2 * p['flux'] / GB:.1f} GB")
        print(f"- T5-XXL encoder (FLUX text encoder 2): {p['t5'] / 1e9:.2f}B params -> {2 * p['t5'] / GB:.1f} GB"
              " (only while encoding prompts; can be offloaded/dropped)")
        print(f"- Qwen-Image transformer: {p['qwen'] / 1e9:.2f}B params -> {2 * p['qwen'] / GB:.1f} GB")
        print(f"- Qwen2.5-VL-7B text encoder: {QWEN25_VL_7B_PARAMS / 1e9:.2f}B params (published figure)"
              f" -> {2 * QWEN25_VL_7B_PARAMS / GB:.1f} GB (only while encoding)")

    print("\n# Time per trajectory: ESTIMATE = NFE x ASSUMED seconds per NFE (not measured)\n")
    for name, f in FAMILIES.items():
        nfe = S * f["nfe_per_step"]
        sec = nfe * s_per_nfe[name]
        print(f"- {name}: {S} steps x {f['nfe_per_step']} = {nfe} NFE x {s_per_nfe[name]:.2f} s/NFE (assumed) "
              f"= ~{sec:.0f} s per trajectory -> ~{10_000 * sec / 3600:.0f} GPU-hours per 10k, "
              f"~{100_000 * sec / 3600:.0f} GPU-hours per 100k")


def main() -> None:
    """Print the report and keep a copy in benchmarks/results/storage_estimate.md (docs/benchmarks.md embeds it)."""
    import contextlib
    import io
    from pathlib import Path

    import json

    buffer, rows = io.StringIO(), []
    with contextlib.redirect_stdout(buffer):
        report(rows)
    text = buffer.getvalue().replace("\n# ", "\n#### ").replace("# Trajectory", "#### Trajectory", 1)
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    (results / "storage_estimate.md").write_text(text)
    (results / "storage_estimate.json").write_text(json.dumps(rows, indent=2))
    print(buffer.getvalue(), end="")


if __name__ == "__main__":
    main()
