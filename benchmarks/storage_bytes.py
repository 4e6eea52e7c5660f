"""Bytes per stored trajectory for each format x storage dtype x compression, vs raw float32.

    .venv/bin/python benchmarks/storage_bytes.py                        # synthetic digit-like trajectories
    .venv/bin/python benchmarks/storage_bytes.py --source digits        # 512 digits-teacher trajectories (cached)
    .venv/bin/python benchmarks/storage_bytes.py --source flux-shaped   # FLUX-shaped trajectories (cached)
    .venv/bin/python benchmarks/storage_bytes.py --dataset PATH         # re-encode a real dataset's samples
      [--format v1 v2] [--dtypes float16 bfloat16 ...] [--compressions blosc-zstd ...] [--keyframe-every K]

Issue 12's figure (v1 vs v2, every dtype, blosc-zstd, both real sources; one command)::

    .venv/bin/python benchmarks/storage_bytes.py --source digits flux-shaped --format v1 v2 \
        --compressions blosc-zstd --keyframe-every 5

With several sources, each writes its own files (``storage_bytes_digits``, ``storage_bytes_flux_shaped``)
and ``benchmarks/results/storage_bytes_formats.json/.md`` puts them side by side (what docs/benchmarks.md shows).

Synthetic data (default): 8x8 scikit-learn digits packed into 2x2 patches (latent 16x4, as the
embedded teacher), a 50-step shifted schedule, and a curved teacher-like path: the predicted clean
image drifts from the mean digit to the sample's digit as sigma falls, the velocity is
``eps - x0_hat(s)`` plus 1% jitter (network noise), and the states are Euler-integrated from it,
so ``x_{j+1} = x_j - (s_j - s_{j+1}) u_j`` holds exactly as in a real dataset.

Real data: ``--source digits`` generates (once) 512 trajectories of the embedded digits teacher, 50
steps, float32, into ``benchmarks/.cache/digits_f32``; ``--source flux-shaped`` uses the cached
FLUX-shaped float32 dataset of benchmarks/flux_shaped_data.py (4096 tokens x 64, T5 512x4096
conditioning; generated once when missing). Sources are read one shard at a time, decoded to
float32, and re-encoded shard by shard (same shards, same samples) into every configuration.

Formats (``--format``, several in one run): ``v1`` is the frozen v1 writer of
benchmarks/v1_writer.py (all states, per-sample conditioning, sample-axis chunks); ``v2`` is the
product writer (``arcflow.storage.create_or_open_dataset``) once arcflow writes format v2
(keyframed states, step-axis chunks, checksums, conditioning once per unique prompt, float8_e4m3).

Each configuration writes into a fresh local dataset (real files, so per-file overhead of small
chunks counts) and reports per trajectory: ``x``+``u`` bytes (v2: + ``u_scale``), conditioning
bytes, everything-included bytes (cond, metadata, Parquet index), the ratio of x+u to raw float32
x+u, and the decode error (relative RMS of x and u read back vs the float32 source). Writes the
table to stdout, JSON to benchmarks/results/storage_bytes[_LABEL].json and the table as .md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # v1_writer, flux_shaped_data

from arcflow.storage import open_dataset  # noqa: E402

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results" / "storage_bytes.json"
CACHE = BENCH / ".cache"
FORMATS = ("v1", "v2")


# -- sources: shards of float32 trajectories ---------------------------------------------------


class Source:
    """Float32 trajectories to re-encode, handed out one shard at a time (``shards()``)."""

    def __init__(self, name, latent_shape, sigmas, cond_spec, guidance, shard_sizes, shards_fn, stored_dtype="float32",
                 prompts_per_shard=None):
        self.name, self.latent_shape, self.sigmas = name, tuple(latent_shape), np.asarray(sigmas, np.float64)
        self.cond_spec, self.guidance, self.shard_sizes = cond_spec, float(guidance), list(shard_sizes)
        self._shards_fn, self.stored_dtype = shards_fn, stored_dtype
        #: distinct prompts in each shard (format v2 stores the conditioning once per prompt and shard)
        self.prompts_per_shard = list(prompts_per_shard or [])

    @property
    def num_samples(self) -> int:
        return sum(self.shard_sizes)

    @property
    def shard_size(self) -> int:
        return max(self.shard_sizes)

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def shards(self) -> Iterator[dict]:
        """``write_shard`` keyword dicts, shard ids 0, 1, ... (float32 arrays)."""
        return self._shards_fn()


def synthetic(n: int, steps: int = 50, shift: float = 3.0, seed: int = 0, shard_size: int = 128) -> Source:
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
    prompts = [f"a handwritten digit {k}" for k in labels]
    sizes = [min(shard_size, n - s) for s in range(0, n, shard_size)]

    def shards():
        for i, start in enumerate(range(0, n, shard_size)):
            sl = slice(start, start + shard_size)
            ids = np.arange(n)[sl]
            yield dict(shard_id=i, x=x[sl], u=u[sl], sigmas=sig, cond={"class_id": labels[sl].astype(np.int64)},
                       sample_ids=ids, seeds=ids, prompts=prompts[sl], guidance=3.0)

    per_shard = [len(set(prompts[s:s + shard_size])) for s in range(0, n, shard_size)]
    return Source("synthetic digits (see benchmarks/storage_bytes.py)", (16, 4), sig, {"class_id": ((), "int64")},
                  3.0, sizes, shards, prompts_per_shard=per_shard)


def display_path(path) -> str:
    """``path`` relative to the repository when it lies inside it (results carry no machine paths)."""
    p = Path(os.path.abspath(path))  # not resolve(): a symlinked cache keeps its in-repository name
    root = BENCH.parent
    return str(p.relative_to(root)) if p.is_relative_to(root) else str(path)


def from_dataset(url: str, max_samples: int | None = None) -> Source:
    """A dataset's committed shards (in order), up to ``max_samples`` samples, decoded to float32."""
    r = open_dataset(url)
    spec = r.spec
    plan, got = [], 0
    for s, size in sorted(r.shard_sizes().items()):
        take = size if max_samples is None else min(size, max_samples - got)
        if take <= 0:
            break
        plan.append((s, take))
        got += take
    first_steps = r.index(columns=["shard", "row", "step", "prompt"], shards=[s for s, _ in plan])
    first_steps = first_steps[first_steps["step"] == 0]
    per_shard = [first_steps[(first_steps["shard"] == s) & (first_steps["row"] < take)]["prompt"].nunique()
                 for s, take in plan]

    def shards():
        for i, (s, take) in enumerate(plan):
            d = r.read_shard(s, rows=None if take == r.shard_sizes([s])[s] else list(range(take)))
            part = r.index(columns=["row", "step", "prompt"], shards=[s])
            prompts = part[part["step"] == 0].sort_values("row")["prompt"].tolist()[:take]
            yield dict(shard_id=i, x=d["x"], u=d["u"], sigmas=np.asarray(spec.sigmas),
                       cond={k: d[k] for k in spec.cond_spec}, sample_ids=d["sample_id"], seeds=d["seed"],
                       prompts=prompts, guidance=d["guidance"])

    return Source(display_path(url) if "://" not in url else url, spec.latent_shape, spec.sigmas, {k: (f.shape, f.dtype) for k, f in spec.cond_spec.items()},
                  spec.guidance, [t for _, t in plan], shards, stored_dtype=spec.storage_dtype,
                  prompts_per_shard=per_shard)


def digits_dataset(num_samples: int = 512, shard_size: int = 128, out: Path = CACHE / "digits_f32") -> Path:
    """The cached digits-teacher float32 dataset (generated, or resumed, when incomplete), i.e.
    ``arcflow generate-trajectories --teacher digits -n 512 --steps 50 --dtype float32 --shard-size 128``."""
    from arcflow.pipeline.generate import generate_trajectories
    from arcflow.pipeline.generation_config import GenerationConfig

    if (out / "dataset.json").is_file():
        r = open_dataset(str(out))
        if r.spec.num_samples == num_samples and len(r.committed_shards()) == r.spec.num_shards:
            return out
    generate_trajectories(GenerationConfig(
        out=str(out), teacher="digits", num_samples=num_samples, steps=50, shard_size=shard_size, dtype="float32",
        threads=1, resume=(out / "dataset.json").is_file()), progress=False)
    return out


def resolve_source(args, source: str) -> tuple[Source, str]:
    """(source, label); the label names the result files (empty: the default synthetic run)."""
    if args.dataset:
        return from_dataset(args.dataset, args.samples), args.label or Path(args.dataset).name
    if source == "digits":
        return from_dataset(str(digits_dataset()), args.samples), args.label or "digits"
    if source == "flux-shaped":
        import flux_shaped_data

        return from_dataset(str(flux_shaped_data.ensure_dataset(progress=False)), args.samples), args.label or "flux_shaped"
    return synthetic(args.samples or 512, shard_size=args.shard_size or 128), args.label or ""


# -- writers: one per format ------------------------------------------------------------------


def format_dtypes(fmt: str) -> tuple[str, ...]:
    if fmt == "v1":
        from v1_writer import STORAGE_DTYPES

        return STORAGE_DTYPES
    from arcflow.storage.format import STORAGE_DTYPES

    return STORAGE_DTYPES


def open_writer(fmt: str, root: Path, spec_kwargs: dict, keyframe_every: int | None):
    """A fresh dataset of format ``fmt`` at ``root``; its ``write_shard`` takes the product's arguments."""
    if fmt == "v1":
        from v1_writer import V1Spec, create_v1_dataset

        return create_v1_dataset(str(root), V1Spec(**spec_kwargs))
    # ---- format v2: the product writer ---------------------------------------------------------
    from arcflow.storage import format as product_format

    if product_format.FORMAT_VERSION != 2:
        raise SystemExit(f"--format v2 needs arcflow's format v2 writer; this arcflow writes v{product_format.FORMAT_VERSION}")
    from arcflow.storage import DatasetSpec, create_or_open_dataset

    kwargs = dict(spec_kwargs)
    if keyframe_every is not None:
        kwargs["keyframe_every"] = keyframe_every  # v2 DatasetSpec field (default 5)
    return create_or_open_dataset(str(root), DatasetSpec(**kwargs))


def array_bytes(root: Path) -> dict[str, int]:
    """Stored bytes by array name over all shard groups (chunks only; ``zarr.json`` files go to
    ``zarr_metadata``), plus ``index`` (Parquet parts) and ``dataset_json``. Format-agnostic: it
    walks the files, so it counts v1 and v2 (and whatever arrays v2 adds) the same way."""
    out: dict[str, int] = {"zarr_metadata": 0, "index": 0, "dataset_json": (root / "dataset.json").stat().st_size}
    for dirpath, _, files in os.walk(root / "index"):
        out["index"] += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    for group in sorted((root / "shards").iterdir()):
        for dirpath, _, files in os.walk(group):
            rel = Path(dirpath).relative_to(group).parts
            for f in files:
                size = os.path.getsize(os.path.join(dirpath, f))
                key = "zarr_metadata" if f == "zarr.json" or not rel else rel[0]
                out[key] = out.get(key, 0) + size
    return out


def _rel_rms(got: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    err = np.einsum("i,i->", d := (got - ref).reshape(-1), d, dtype=np.float64)
    ref_sq = np.einsum("i,i->", r := ref.reshape(-1), r, dtype=np.float64)
    return float(err), float(ref_sq)


def spec_kwargs(src: Source, dtype: str, compression: str) -> dict:
    """Dataset spec fields (common to the v1 and v2 specs) for re-encoding ``src``."""
    return dict(
        teacher_id="benchmark", teacher_revision="-", latent_shape=src.latent_shape, sigmas=src.sigmas, shift=1.0,
        guidance=src.guidance, num_samples=src.num_samples, shard_size=src.shard_size, seed=0,
        cond_spec=src.cond_spec, storage_dtype=dtype, compression=compression,
    )


def encode(src: Source, fmt: str, dtype: str, compression: str, root: Path, keyframe_every: int | None = None):
    """Write all of ``src`` as a fresh dataset at ``root``; returns (writer, seconds spent in write_shard)."""
    w = open_writer(fmt, root, spec_kwargs(src, dtype, compression), keyframe_every)
    write_s = 0.0
    for shard in src.shards():
        t0 = time.perf_counter()
        w.write_shard(**shard)
        write_s += time.perf_counter() - t0
    return w, write_s


def measure(src: Source, fmt: str, dtype: str, compression: str, workdir: Path, keyframe_every: int | None) -> dict:
    n = src.num_samples
    root = workdir / f"{fmt}-{dtype}-{compression}"
    w, write_s = encode(src, fmt, dtype, compression, root, keyframe_every)
    r = open_dataset(str(root))
    read_s, sq = 0.0, {"x": [0.0, 0.0], "u": [0.0, 0.0]}
    for shard in src.shards():
        t0 = time.perf_counter()
        d = r.read_shard(shard["shard_id"])
        read_s += time.perf_counter() - t0
        for k in sq:
            e, s = _rel_rms(d[k], np.asarray(shard[k], np.float32))
            sq[k][0] += e
            sq[k][1] += s
        del d
    b = array_bytes(root)
    shutil.rmtree(root)
    raw = (2 * src.steps + 1) * math.prod(src.latent_shape) * 4
    raw_cond = sum(4 * math.prod(shape) for shape, dt in src.cond_spec.values() if "float" in str(dt))
    xu = (b.get("x", 0) + b.get("u", 0) + b.get("u_scale", 0)) / n
    cond = sum(b.get(k, 0) for k in [*src.cond_spec, "cond_row"]) / n
    total = sum(b.values()) / n
    return {
        "format": fmt, "storage_dtype": dtype, "compression": compression, "samples": n,
        "samples_per_chunk": getattr(w.spec, "samples_per_chunk", None),
        "keyframe_every": getattr(w.spec, "keyframe_every", None),
        "xu_bytes_per_traj": round(xu, 1), "cond_bytes_per_traj": round(cond, 1),
        "total_bytes_per_traj": round(total, 1), "index_bytes_per_traj": round(b["index"] / n, 1),
        "bytes_by_array_per_traj": {k: round(v / n, 1) for k, v in sorted(b.items())},
        "raw_f32_xu_bytes_per_traj": raw, "raw_f32_cond_bytes_per_traj": raw_cond,
        "xu_ratio_vs_raw_f32": round(xu / raw, 4),
        "x_rel_rms_err": math.sqrt(sq["x"][0] / sq["x"][1]), "u_rel_rms_err": math.sqrt(sq["u"][0] / sq["u"][1]),
        "write_s": round(write_s, 3), "read_s": round(read_s, 3),
    }


def table(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"Bytes per trajectory (`benchmarks/storage_bytes.py`), source: {meta['source']}; {meta['samples']} trajectories, "
        f"latent {tuple(meta['latent_shape'])}, {meta['steps']} steps, source stored as {meta['source_storage_dtype']}; "
        f"raw float32 x + u = {rows[0]['raw_f32_xu_bytes_per_traj']:,} B, raw float32 cond = "
        f"{rows[0]['raw_f32_cond_bytes_per_traj']:,} B per trajectory.",
        "",
        "| format | storage dtype | compression | x + u bytes | ratio vs raw float32 | cond bytes | all bytes | x rel. RMS err | u rel. RMS err | write s | read s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['format']} | {r['storage_dtype']} | {r['compression']} | {r['xu_bytes_per_traj']:,.0f} | "
            f"{r['xu_ratio_vs_raw_f32']:.3f} | {r['cond_bytes_per_traj']:,.0f} | {r['total_bytes_per_traj']:,.0f} | "
            f"{r['x_rel_rms_err']:.1e} | {r['u_rel_rms_err']:.1e} | {r['write_s']:.2f} | {r['read_s']:.2f} |")
    return "\n".join(lines) + "\n"


#: How the side-by-side table names a source (by its result label).
DISPLAY = {"": "synthetic", "digits": "digits", "flux_shaped": "FLUX-shaped"}


def _size(b: float) -> str:
    """Bytes with a unit, 3 significant digits (``11.2 kB``, ``27.9 MB``)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= scale:
            return f"{b / scale:.3g} {unit}"
    return f"{b:.0f} B"


def formats_table(runs: list[tuple[dict, list[dict]]]) -> str:
    """Sources side by side: x + u bytes and their ratio to raw float32, conditioning bytes, per trajectory."""
    names = [DISPLAY.get(meta["label"], meta["label"]) for meta, _ in runs]
    comps = sorted({r["compression"] for _, rows in runs for r in rows})
    kf = next((r["keyframe_every"] for _, rows in runs for r in rows if r["format"] == "v2"), None)
    lines = [
        "Bytes per trajectory (`benchmarks/storage_bytes.py`, compression " + ", ".join(comps)
        + (f", v2 keyframes every {kf} steps" if kf else "") + "): " + "; ".join(
            f"**{name}** = {meta['samples']} trajectories, latent {tuple(meta['latent_shape'])}, {meta['steps']} steps, "
            f"shards of {meta['shard_size']} with {meta['prompts_per_shard']:g} prompts each, raw float32 x + u "
            f"{_size(rows[0]['raw_f32_xu_bytes_per_traj'])}, raw float32 cond {_size(rows[0]['raw_f32_cond_bytes_per_traj'])}"
            for name, (meta, rows) in zip(names, runs))
        + ". x + u includes float8's per-step scales; cond is every conditioning array (v1: per sample, v2: once per "
        "prompt and shard).",
        "",
        "| format | storage dtype | " + " | ".join(f"{n}: x + u | {n}: vs raw f32 | {n}: cond" for n in names) + " |",
        "|---|---|" + "---:|---:|---:|" * len(runs),
    ]
    keys = []
    for _, rows in runs:
        keys += [k for r in rows if (k := (r["format"], r["storage_dtype"], r["compression"])) not in keys]
    for key in keys:
        cells = []
        for _, rows in runs:
            r = next((r for r in rows if (r["format"], r["storage_dtype"], r["compression"]) == key), None)
            cells += ["-"] * 3 if r is None else [
                _size(r["xu_bytes_per_traj"]), f"{r['xu_ratio_vs_raw_f32']:.3f}", _size(r["cond_bytes_per_traj"])]
        label = key[1] if len(comps) == 1 else f"{key[1]} {key[2]}"
        lines.append(f"| {key[0]} | {label} | " + " | ".join(cells) + " |")
    v2 = [(name, r) for name, (_, rows) in zip(names, runs) for r in rows
          if (r["format"], r["storage_dtype"]) == ("v2", "float16")]
    if v2:
        lines += ["", "v2 default (float16) x + u vs raw float32: " + ", ".join(
            f"{name} {r['xu_ratio_vs_raw_f32']:.3f}" for name, r in v2) + " (bar: <= 0.30)."]
    return "\n".join(lines) + "\n"


def run_source(args, source: str) -> tuple[dict, list[dict]]:
    """Measure every format x dtype x compression on one source; writes its JSON (and .md)."""
    src, label = resolve_source(args, source)
    rows = []
    print(f"{src.name}: {src.num_samples} samples", flush=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for fmt in args.formats:
            valid = format_dtypes(fmt)
            for dtype in args.dtypes or valid:
                if dtype not in valid:
                    print(f"skip {fmt} {dtype}: not a storage dtype of format {fmt} ({', '.join(valid)})")
                    continue
                for comp in args.compressions:
                    rows.append(measure(src, fmt, dtype, comp, Path(tmp), args.keyframe_every))
                    r = rows[-1]
                    print(f"  {fmt} {dtype} {comp}: x+u {r['xu_ratio_vs_raw_f32']:.3f} of raw f32 "
                          f"(write {r['write_s']:.1f} s, read {r['read_s']:.1f} s)", flush=True)
    meta = {
        "source": src.name, "label": label, "samples": src.num_samples, "shard_size": src.shard_size,
        "latent_shape": list(src.latent_shape), "steps": src.steps, "source_storage_dtype": src.stored_dtype,
        "cond_spec": {k: [list(s), str(t)] for k, (s, t) in src.cond_spec.items()},
        "prompts_per_shard": float(np.mean(src.prompts_per_shard)),
        "python": sys.version.split()[0], "machine": platform.machine(), "cpus": os.cpu_count(),
    }
    text = table(meta, rows)
    print(text)
    out = Path(args.out) if args.out else RESULTS.with_name(f"storage_bytes{'_' + label if label else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
    if label:  # the default synthetic table is rendered by benchmarks/tables.py
        out.with_suffix(".md").write_text(text)
    print(f"wrote {out}")
    return meta, rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", nargs="+", choices=("synthetic", "digits", "flux-shaped"), default=["synthetic"],
                    dest="sources", help="one or more sources; several also write storage_bytes_formats.json/.md")
    ap.add_argument("--dataset", help="re-encode samples of this dataset instead (overrides --source)")
    ap.add_argument("--samples", type=int, default=None, help="at most this many samples (synthetic: 512)")
    ap.add_argument("--shard-size", type=int, default=None, help="synthetic only (128); datasets keep their shards")
    ap.add_argument("--format", nargs="+", choices=FORMATS, default=["v1"], dest="formats")
    ap.add_argument("--dtypes", nargs="+", default=None, help="storage dtypes (default: all of each format)")
    ap.add_argument("--compressions", nargs="+", default=["zstd", "blosc-zstd", "none"])
    ap.add_argument("--keyframe-every", type=int, default=None, help="v2 only (default: the format's, 5)")
    ap.add_argument("--label", default=None, help="names the result files (default: the source's name)")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/storage_bytes[_LABEL].json)")
    ap.add_argument("--summary-out", default=None,
                    help="JSON path of the side-by-side summary (default: benchmarks/results/storage_bytes_formats.json)")
    ap.add_argument("--workdir", default=None, help="scratch directory for the re-encoded datasets (default: a temp dir)")
    args = ap.parse_args(argv)
    sources = [None] if args.dataset else list(dict.fromkeys(args.sources))
    if len(sources) > 1 and (args.label or args.out):
        ap.error("--label/--out name one source's files; leave them out with several sources")
    runs = [run_source(args, source) for source in sources]
    if len(runs) > 1:
        text = formats_table(runs)
        out = Path(args.summary_out) if args.summary_out else RESULTS.with_name("storage_bytes_formats.json")
        out.write_text(json.dumps({"sources": [{**meta, "results": rows} for meta, rows in runs]}, indent=2) + "\n")
        out.with_suffix(".md").write_text(text)
        print(text)
        print(f"wrote {out} and {out.with_suffix('.md').name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
