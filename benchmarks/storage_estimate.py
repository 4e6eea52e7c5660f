"""Storage, GPU memory and (estimated) time for trajectory datasets of FLUX.1-dev and Qwen-Image.

    .venv/bin/python benchmarks/storage_estimate.py                       # 1024x1024, 50 steps
    .venv/bin/python benchmarks/storage_estimate.py --size 512 --steps 28
    .venv/bin/python benchmarks/storage_estimate.py --flux-s-per-nfe 0.3 --qwen-s-per-nfe 0.5

Bytes come from the packed latent shape (tokens x channels: 1024x1024 -> 64x64 tokens of 64
channels for both families), S+1 states ``x`` and S velocities ``u`` per trajectory, plus the stored
conditioning (FLUX: T5 512x4096 + pooled 768; Qwen-Image: 512x3584 embeddings + 512 mask at the
teacher's default ``max_sequence_length``), all in the storage dtype, uncompressed. Parameter counts
of the transformers (and T5-XXL) come from instantiating the real configs on the meta device.

Compression is measured on a small random example (Gaussian states, as noisy latents are): zstd
through blosc with byte shuffle, as the dataset writer uses.

Time per trajectory is an ESTIMATE: network evaluations (FLUX.1-dev: S x 1, embedded guidance;
Qwen-Image: S x 2, true CFG) times an ASSUMED seconds-per-NFE (flags above). Nothing here is timed.
"""

from __future__ import annotations

import argparse

import numpy as np

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
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


def report() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1024, help="image height = width in pixels")
    ap.add_argument("--steps", type=int, default=50, help="teacher Euler steps S")
    ap.add_argument("--flux-s-per-nfe", type=float, default=ASSUMED_S_PER_NFE["FLUX.1-dev"])
    ap.add_argument("--qwen-s-per-nfe", type=float, default=ASSUMED_S_PER_NFE["Qwen-Image"])
    ap.add_argument("--shard-gb", type=float, default=1.5, help="target shard size for the recommendation")
    ap.add_argument("--no-params", action="store_true", help="skip the meta-device parameter counts")
    args = ap.parse_args()
    s_per_nfe = {"FLUX.1-dev": args.flux_s_per_nfe, "Qwen-Image": args.qwen_s_per_nfe}
    S = args.steps

    print(f"# Trajectory storage at {args.size}x{args.size}, {S} steps ({S + 1} states x, {S} velocities u)\n")
    print("| teacher | latent (tokens x ch) | dtype | x+u per traj | cond per traj | total per traj | 10k prompts | 100k prompts | trajs per ~%.1f GB shard |" % args.shard_gb)
    print("|---|---|---|---|---|---|---|---|---|")
    for name, f in FAMILIES.items():
        tokens = (args.size // f["vae_scale"] // 2) ** 2
        latent = tokens * f["channels"]
        for dtype, nbytes in DTYPE_BYTES.items():
            xu = (2 * S + 1) * latent * nbytes
            cond = f["cond"] * nbytes
            total = xu + cond
            per_shard = max(1, int(args.shard_gb * GB // total))
            print(
                f"| {name} | {tokens} x {f['channels']} | {dtype} | {xu / 1e6:.1f} MB | {cond / 1e6:.1f} MB "
                f"| {total / 1e6:.1f} MB | {10_000 * total / GB:.0f} GB | {100_000 * total / 1e12:.2f} TB | {per_shard} |"
            )
    print("\nconditioning stored per sample: " + "; ".join(f"{n}: {f['cond_text']}" for n, f in FAMILIES.items()))

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
    """Print the report and keep a copy in benchmarks/results/storage_estimate.md (the README's)."""
    import contextlib
    import io
    from pathlib import Path

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        report()
    text = buffer.getvalue().replace("\n# ", "\n#### ").replace("# Trajectory", "#### Trajectory", 1)
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    (results / "storage_estimate.md").write_text(text)
    print(buffer.getvalue(), end="")


if __name__ == "__main__":
    main()
