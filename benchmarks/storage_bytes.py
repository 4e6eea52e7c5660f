"""Bytes per stored trajectory for each storage dtype x compression, vs raw float32.

    .venv/bin/python benchmarks/storage_bytes.py                    # synthetic digit-like trajectories
    .venv/bin/python benchmarks/storage_bytes.py --dataset PATH     # re-encode a real dataset's samples

Synthetic data (default): 8x8 scikit-learn digits packed into 2x2 patches (latent 16x4, as the
embedded teacher), a 50-step shifted schedule, and a curved teacher-like path: the predicted clean
image drifts from the mean digit to the sample's digit as sigma falls, the velocity is
``eps - x0_hat(s)`` plus 1% jitter (network noise), and the states are Euler-integrated from it,
so ``x_{j+1} = x_j - (s_j - s_{j+1}) u_j`` holds exactly as in a real dataset.

Each configuration writes the same trajectories into a fresh local dataset (real files, so per-file
overhead of small chunks counts) and reports ``x``+``u`` bytes per trajectory, everything-included
bytes per trajectory (cond, metadata, Parquet index), and the ratio to raw float32 x+u.
Writes the table to stdout and JSON to benchmarks/results/storage_bytes.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from arcflow.storage import DatasetSpec, create_or_open_dataset, open_dataset
from arcflow.storage.format import COMPRESSIONS, STORAGE_DTYPES

RESULTS = Path(__file__).parent / "results" / "storage_bytes.json"


def synthetic(n: int, steps: int = 50, shift: float = 3.0, seed: int = 0):
    from sklearn.datasets import load_digits

    digits = load_digits().images.astype(np.float32) / 16.0 * 2 - 1  # [-1, 1], (1797, 8, 8)
    rng = np.random.default_rng(seed)
    imgs = digits[rng.integers(len(digits), size=n)]
    # 2x2 patch packing, as FLUX packs latents: (8, 8) -> 16 tokens x 4 channels
    x0 = imgs.reshape(n, 4, 2, 4, 2).transpose(0, 1, 3, 2, 4).reshape(n, 16, 4)
    mean = x0.mean(axis=0, keepdims=True)
    r = np.linspace(1.0, 0.0, steps + 1)
    sig = shift * r / (1 + (shift - 1) * r)
    eps = rng.standard_normal(x0.shape).astype(np.float32)
    x = np.empty((n, steps + 1, 16, 4), np.float32)
    u = np.empty((n, steps, 16, 4), np.float32)
    x[:, 0] = eps
    for j in range(steps):
        w = (1 - sig[j]) ** 0.5
        x0_hat = (1 - w) * mean + w * x0
        uj = eps - x0_hat
        uj = uj + 0.01 * rng.standard_normal(uj.shape).astype(np.float32) * np.sqrt((uj**2).mean())
        u[:, j] = uj
        x[:, j + 1] = x[:, j] - (sig[j] - sig[j + 1]) * uj
    labels = rng.integers(10, size=n)
    cond = {"class_id": labels.astype(np.int64)}
    return dict(x=x, u=u, sigmas=sig, cond=cond, cond_spec={"class_id": ((), "int64")},
                prompts=[f"a handwritten digit {k}" for k in labels], latent_shape=(16, 4), guidance=3.0)


def from_dataset(url: str, max_samples: int):
    r = open_dataset(url)
    xs, us, conds, prompts = [], [], {k: [] for k in r.spec.cond_spec}, []
    got = 0
    for s in r.require_committed_shards():
        d = r.read_shard(s)
        take = min(len(d["sample_id"]), max_samples - got)
        xs.append(d["x"][:take]), us.append(d["u"][:take])
        for k in conds:
            conds[k].append(d[k][:take])
        part = r.index(columns=["row", "step", "prompt"], shards=[s])
        prompts += part[part["step"] == 0].sort_values("row")["prompt"].tolist()[:take]
        got += take
        if got >= max_samples:
            break
    spec = r.spec
    return dict(x=np.concatenate(xs), u=np.concatenate(us), sigmas=np.asarray(spec.sigmas),
                cond={k: np.concatenate(v) for k, v in conds.items()},
                cond_spec={k: (f.shape, f.dtype) for k, f in spec.cond_spec.items()}, prompts=prompts,
                latent_shape=spec.latent_shape, guidance=spec.guidance)


def measure(data: dict, dtype: str, compression: str, shard_size: int, workdir: Path) -> dict:
    n = len(data["x"])
    spec = DatasetSpec(
        teacher_id="benchmark", teacher_revision="-", latent_shape=data["latent_shape"], sigmas=data["sigmas"],
        shift=1.0, guidance=data["guidance"], num_samples=n, shard_size=shard_size, seed=0,
        cond_spec=data["cond_spec"], storage_dtype=dtype, compression=compression,
    )
    root = workdir / f"{dtype}-{compression}"
    w = create_or_open_dataset(str(root), spec)
    t0 = time.perf_counter()
    for s in range(spec.num_shards):
        sl = slice(s * shard_size, min(n, (s + 1) * shard_size))
        ids = np.arange(n)[sl]
        w.write_shard(s, data["x"][sl], data["u"][sl], data["sigmas"], {k: v[sl] for k, v in data["cond"].items()},
                      ids, ids, data["prompts"][sl], data["guidance"])
    write_s = time.perf_counter() - t0
    r = open_dataset(str(root))
    t0 = time.perf_counter()
    for s in range(spec.num_shards):
        r.read_shard(s)
    read_s = time.perf_counter() - t0
    b = r.bytes_on_disk()
    steps = len(data["sigmas"]) - 1
    raw = (2 * steps + 1) * math.prod(data["latent_shape"]) * 4
    xu = (b["x"] + b["u"]) / n
    shutil.rmtree(root)
    return {
        "storage_dtype": dtype, "compression": compression, "samples": n,
        "samples_per_chunk": spec.samples_per_chunk,
        "xu_bytes_per_traj": round(xu, 1), "total_bytes_per_traj": round(b["total"] / n, 1),
        "index_bytes_per_traj": round(b["index"] / n, 1), "raw_f32_xu_bytes_per_traj": raw,
        "xu_ratio_vs_raw_f32": round(xu / raw, 4), "write_s": round(write_s, 3), "read_s": round(read_s, 3),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", help="re-encode samples of this dataset instead of synthetic ones")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--shard-size", type=int, default=128)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    data = from_dataset(args.dataset, args.samples) if args.dataset else synthetic(args.samples)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in STORAGE_DTYPES:
            for comp in COMPRESSIONS:
                rows.append(measure(data, dtype, comp, args.shard_size, Path(tmp)))
    hdr = f"{'dtype':<9} {'compression':<11} {'x+u B/traj':>11} {'vs raw f32':>10} {'all B/traj':>11} {'index B/traj':>12} {'write s':>8} {'read s':>7}"
    print(f"source: {args.dataset or 'synthetic digits'}; {len(data['x'])} trajectories, latent {tuple(data['latent_shape'])}, "
          f"{len(data['sigmas']) - 1} steps; raw float32 x+u = {rows[0]['raw_f32_xu_bytes_per_traj']} B/traj")
    print(hdr)
    for r in rows:
        print(f"{r['storage_dtype']:<9} {r['compression']:<11} {r['xu_bytes_per_traj']:>11.0f} {r['xu_ratio_vs_raw_f32']:>10.3f} "
              f"{r['total_bytes_per_traj']:>11.0f} {r['index_bytes_per_traj']:>12.0f} {r['write_s']:>8.2f} {r['read_s']:>7.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "source": args.dataset or "synthetic digits (see benchmarks/storage_bytes.py)",
        "samples": len(data["x"]), "shard_size": args.shard_size, "latent_shape": list(data["latent_shape"]),
        "steps": len(data["sigmas"]) - 1, "python": sys.version.split()[0], "machine": platform.machine(),
        "results": rows,
    }, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
