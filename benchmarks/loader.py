"""Streaming loader benchmarks: digits-shaped throughput vs the trainer and RSS with 1x vs 10x the
shards; FLUX-shaped examples/s, bytes read per example vs bytes the loss uses, peak RSS per worker.

    .venv/bin/python benchmarks/loader.py            # both parts: prints tables, writes benchmarks/results/
                                                     #   loader.json/.md and loader_flux_shaped.json/.md
    .venv/bin/python benchmarks/loader.py --parts flux --format v1 v2 --dtype float16

Digits part (``loader.json``):

* loader throughput: samples/s that `TrajectoryStream` + a DataLoader deliver (one pass, shuffled),
  on trajectories shaped like the digits teacher's (50 steps, latent 16x4, ``--dtype`` storage);
* trainer consumption: samples/s one training step of the default student (K=8, LoRA r=16) on the
  embedded digits teacher consumes (forward + backward + AdamW, batch 64), measured in this process;
* peak RSS: a fresh process streams one full epoch of a dataset with 1x and with 10x the shards
  (same shard size); streaming holds one shard (+ the shuffle buffer) per worker, so the peak should
  not grow with the dataset.

FLUX-shaped part (``loader_flux_shaped.json``): the cached FLUX-shaped trajectories of
benchmarks/flux_shaped_data.py (4096 tokens x 64, 50 steps, T5 512x4096 conditioning), re-encoded
once per format and ``--dtype`` into ``benchmarks/.cache/flux_shaped/<format>_<dtype>`` (blosc-zstd),
streamed by a fresh process with 0 and 2 DataLoader workers for ``--flux-epochs`` epochs. Per run:
examples/s; per reading process (each worker, or the main process without workers) the bytes it
read (``/proc/<pid>/io`` ``rchar``: every read() whether from disk or page cache; ``read_bytes``:
from the device) and its peak RSS (``VmHWM``, which includes the pages shared with the parent at
fork, so ``rss_start_mb`` is given too). "Used" bytes are what the NFE=2 loss reads of one example:
one state and ``steps / 2`` velocities of the latent in the storage dtype (float8: 1-byte
velocities + per-step scales, float16 state), plus the conditioning in the storage dtype.

An example is what one loss term consumes, one (sample, segment): a format v1 stream item is a
whole trajectory (the trainer draws one segment of it), a format v2 stream item is one segment.

``--format`` picks the writer of the benchmark data: ``v1`` = benchmarks/v1_writer.py, ``v2`` =
the product writer (once arcflow writes v2). The stream is always arcflow's ``TrajectoryStream``
(see ``make_stream``: per-segment items when it takes ``segment_bounds``, i.e. from format v2 on).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # v1_writer, storage_bytes, flux_shaped_data

RESULTS = Path(__file__).parent / "results"
STEPS, LATENT, SHARD = 50, (16, 4), 500
#: NFE=2 over 50 recorded steps: the student's two segments.
SEGMENT_BOUNDS = [0, 25, 50]


# -- data -------------------------------------------------------------------------------------


def write_synthetic(url: Path, shards: int, fmt: str = "v1", dtype: str = "float16") -> None:
    """Trajectory-shaped random data through the ``fmt`` writer (``dtype``, compressed)."""
    from storage_bytes import open_writer

    from arcflow.pipeline.schedule import shifted_schedule

    sigmas = shifted_schedule(STEPS, 1.0).numpy()
    spec = dict(
        teacher_id="synthetic", teacher_revision="0", latent_shape=LATENT, sigmas=sigmas, shift=1.0,
        guidance=3.0, num_samples=shards * SHARD, shard_size=SHARD, seed=0, storage_dtype=dtype,
        cond_spec={"prompt_embeds": ((4, 32), "float32"), "pooled_prompt_embeds": ((32,), "float32")},
    )
    writer = open_writer(fmt, url, spec, None)
    rng = np.random.default_rng(0)
    for shard in range(shards):
        noise = rng.standard_normal((SHARD, 1, *LATENT)).astype(np.float32)
        data = rng.uniform(-1, 1, (SHARD, 1, *LATENT)).astype(np.float32)
        s = sigmas.reshape(1, -1, 1, 1).astype(np.float32)
        x = (1 - s) * data + s * noise
        u = (x[:, :-1] - x[:, 1:]) / (s[:, :-1] - s[:, 1:])
        ids = list(range(shard * SHARD, (shard + 1) * SHARD))
        writer.write_shard(
            shard, x=x, u=u, sigmas=sigmas,
            cond={"prompt_embeds": rng.standard_normal((SHARD, 4, 32)).astype(np.float32),
                  "pooled_prompt_embeds": rng.standard_normal((SHARD, 32)).astype(np.float32)},
            sample_ids=ids, seeds=ids, prompts=[f"p{i % 10}" for i in ids], guidance=3.0,
        )


def flux_dataset(fmt: str, dtype: str, rewrite: bool = False) -> Path:
    """The FLUX-shaped trajectories as a ``fmt`` / ``dtype`` / blosc-zstd dataset, cached next to the
    float32 source; re-encoded when the source, the format or the dtype changed (or ``rewrite``)."""
    import flux_shaped_data
    from storage_bytes import display_path, encode, from_dataset

    from arcflow.storage import open_dataset

    source = flux_shaped_data.ensure_dataset(progress=False)
    out = flux_shaped_data.CACHE / f"{fmt}_{dtype}"
    marker = out.with_name(out.name + ".json")
    want = {"source": display_path(source), "source_fingerprint": open_dataset(str(source)).fingerprint(), "format": fmt,
            "storage_dtype": dtype, "compression": "blosc-zstd"}
    if not rewrite and marker.is_file() and (out / "dataset.json").is_file():
        recorded = json.loads(marker.read_text())
        if {k: recorded.get(k) for k in want} == want:
            return out
    marker.unlink(missing_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    _, seconds = encode(from_dataset(str(source)), fmt, dtype, "blosc-zstd", out)
    marker.write_text(json.dumps({**want, "write_s": seconds}, indent=2) + "\n")
    return out


def used_bytes(latent_shape, steps: int, dtype: str, cond_spec: dict, nfe: int = 2) -> dict:
    """Bytes of one NFE=``nfe`` example the loss uses, in the storage dtype: one state + steps/nfe velocities."""
    d = math.prod(latent_shape)
    width = steps // nfe
    x_item = 4 if dtype == "float32" else 2  # float8_e4m3 keeps states and conditioning in float16
    u_item = 1 if dtype == "float8_e4m3" else x_item
    xu = d * x_item + width * d * u_item + (4 * width if dtype == "float8_e4m3" else 0)
    cond = sum(math.prod(f.shape) * (x_item if f.is_floating else np.dtype(f.dtype).itemsize) for f in cond_spec.values())
    return {"xu": xu, "cond": cond, "segment_width": width}


# -- streaming --------------------------------------------------------------------------------


def make_stream(url: str, *, epochs: int, shuffle_buffer: int, seed: int = 0):
    """arcflow's ``TrajectoryStream`` over ``url``; returns (stream, kind)."""
    from arcflow.storage.streaming import TrajectoryStream

    if "segment_bounds" in inspect.signature(TrajectoryStream).parameters:
        # ---- format v2 stream: one item per (sample, segment): x (segment-start state), sigma,
        # sigmas (sub-step sigmas, padded), u [W, *latent], weights [W], segment, conditioning ----
        stream = TrajectoryStream(url, segment_bounds=SEGMENT_BOUNDS, seed=seed, shuffle_buffer=shuffle_buffer,
                                  epochs=epochs)
        return stream, "per-segment items (v2 stream)"
    # ---- format v1 stream: one item per sample, the whole trajectory (x [S+1], u [S]) ----
    return TrajectoryStream(url, seed=seed, shuffle_buffer=shuffle_buffer, epochs=epochs), "per-sample items (v1 stream)"


def _proc(pid="self") -> dict:
    """rchar / read_bytes (bytes) and VmHWM / VmRSS (MB) of a process."""
    out = {}
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            k, v = line.split(":")
            if k in ("rchar", "read_bytes"):
                out[k] = int(v)
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmHWM", "VmRSS")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out


class Measured(torch.utils.data.IterableDataset):
    """Passes a stream through and, when this process's share is exhausted, writes its own I/O and
    memory figures to ``report_dir`` (one JSON per reading process: a DataLoader worker or main)."""

    def __init__(self, stream, report_dir: str):
        super().__init__()
        self.stream, self.report_dir = stream, report_dir

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else -1
        start, t0, n = _proc(), time.perf_counter(), 0
        for item in self.stream:
            n += 1
            yield item
        end = _proc()
        Path(self.report_dir, f"reader-{wid}-{os.getpid()}.json").write_text(json.dumps({
            "worker": wid, "pid": os.getpid(), "items": n, "seconds": time.perf_counter() - t0,
            "rchar": end["rchar"] - start["rchar"], "read_bytes": end["read_bytes"] - start["read_bytes"],
            "rss_start_mb": start["VmRSS"], "peak_rss_mb": end["VmHWM"],
        }))


def stream_epoch(url: str, workers: int, batch: int, epochs: int = 1, shuffle_buffer: int = 512) -> dict:
    """Stream ``epochs`` epochs through the loader; returns examples/s, this process's peak RSS and
    the per-reading-process figures of ``Measured``."""
    import resource

    import zarr.api.asynchronous  # noqa: F401  (imported before the clock and before the workers fork)
    import zarr.storage  # noqa: F401

    stream, kind = make_stream(url, epochs=epochs, shuffle_buffer=shuffle_buffer)
    with tempfile.TemporaryDirectory() as reports:
        loader = torch.utils.data.DataLoader(Measured(stream, reports), batch_size=batch, num_workers=workers)
        start = time.perf_counter()
        count, first = 0, None
        for item in loader:
            count += item["u"].shape[0]
            if first is None:
                first = (time.perf_counter() - start, count)
        seconds = time.perf_counter() - start
        readers = [json.loads(p.read_text()) for p in sorted(Path(reports).glob("reader-*.json"))]
    # This process's peak from VmHWM, not getrusage(RUSAGE_SELF).ru_maxrss: Linux carries maxrss
    # across execve, so a subprocess's ru_maxrss is at least its parent's RSS when it was spawned.
    peak_mb = _proc()["VmHWM"]
    children_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # forked workers (no exec)
    steady = (count - first[1]) / (seconds - first[0]) if count > first[1] and seconds > first[0] else float("nan")
    return {"samples": count, "seconds": seconds, "samples_per_s": count / seconds, "first_batch_s": first[0],
            "samples_per_s_after_first_batch": steady, "stream": kind,
            "peak_rss_mb": peak_mb, "peak_rss_children_mb": children_kb / 1024, "readers": readers}


def _child(options: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--_child", json.dumps(options)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"loader child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- digits part --------------------------------------------------------------------------------


def trainer_consumption(batch: int, steps: int = 20) -> float:
    """Samples/s of the default student's training step on the digits teacher (synthetic batch)."""
    from arcflow.distill.loss import segment_batch, segment_loss
    from arcflow.distill.student import StudentConfig, build_student
    from arcflow.pipeline.registry import load_teacher

    teacher = load_teacher("digits")
    student = build_student(teacher, StudentConfig(), inplace=True)
    optimizer = torch.optim.AdamW(student.trainable_parameters(), lr=1e-3)
    cond = teacher.encode_prompts(teacher.prompt_set() * (batch // 10 + 1))
    sigmas = teacher.sigmas(STEPS).float()
    batch_data = {
        "x": torch.randn(batch, STEPS + 1, *LATENT), "u": torch.randn(batch, STEPS, *LATENT), "sigmas": sigmas,
        **{k: v[:batch] for k, v in cond.items()},
    }
    items = segment_batch(batch_data.pop("x"), batch_data.pop("u"), batch_data.pop("sigmas"), [0, STEPS // 2, STEPS],
                          torch.arange(batch) % 2, batch_data)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss, _ = segment_loss(student, items, 2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return batch / float(np.median(times[3:]))


def digits_part(args, fmt: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        small, large = Path(tmp) / "x1", Path(tmp) / "x10"
        write_synthetic(small, args.shards, fmt, args.dtype)
        write_synthetic(large, args.shards * 10, fmt, args.dtype)
        runs = {f"{name}_w{w}": _child({"url": str(url), "workers": w, "batch": args.batch})
                for name, url in (("x1", small), ("x10", large)) for w in (0, 2)}
    for r in runs.values():
        r.pop("readers", None)
    consume = trainer_consumption(args.batch)
    loader_rate = max(runs["x10_w0"]["samples_per_s"], runs["x10_w2"]["samples_per_s"])
    return {
        "format": fmt,
        "storage_dtype": args.dtype,
        "batch": args.batch,
        "shard_size": SHARD,
        "shards_1x": args.shards,
        "runs": runs,
        "trainer_samples_per_s": consume,
        "loader_over_trainer": loader_rate / consume,
        "rss_10x_over_1x_workers0": runs["x10_w0"]["peak_rss_mb"] / runs["x1_w0"]["peak_rss_mb"],
        "rss_10x_over_1x_workers2": (runs["x10_w2"]["peak_rss_mb"] + runs["x10_w2"]["peak_rss_children_mb"])
        / (runs["x1_w2"]["peak_rss_mb"] + runs["x1_w2"]["peak_rss_children_mb"]),
    }


def digits_table(results: list[dict]) -> str:
    lines = [
        "| format | loader run | samples | samples/s | peak RSS (MB, main + workers) |",
        "|---|---|---:|---:|---:|",
    ]
    for res in results:
        for name, r in res["runs"].items():
            lines.append(f"| {res['format']} {res['storage_dtype']} | {name} | {r['samples']} | {r['samples_per_s']:.0f} | "
                         f"{r['peak_rss_mb']:.0f} + {r['peak_rss_children_mb']:.0f} |")
    for res in results:
        lines += [
            "",
            f"{res['format']}: trainer consumption (default student, batch {res['batch']}): "
            f"{res['trainer_samples_per_s']:.0f} samples/s; loader / trainer = {res['loader_over_trainer']:.1f}x (goal >= 5x).",
            f"{res['format']}: peak RSS 10x / 1x shards: {res['rss_10x_over_1x_workers0']:.3f} (0 workers), "
            f"{res['rss_10x_over_1x_workers2']:.3f} (2 workers) (goal: within 10%).",
        ]
    return "\n".join(lines)


# -- FLUX-shaped part ---------------------------------------------------------------------------


def flux_part(args, fmt: str) -> dict:
    from arcflow.storage import open_dataset
    from storage_bytes import array_bytes, display_path

    url = flux_dataset(fmt, args.dtype, rewrite=args.rewrite)
    spec = open_dataset(str(url)).spec
    stored = array_bytes(url)
    n = spec.num_samples
    used = used_bytes(spec.latent_shape, spec.steps, args.dtype, spec.cond_spec)
    runs = {}
    for w in (0, 2):
        r = _child({"url": str(url), "workers": w, "batch": args.flux_batch, "epochs": args.flux_epochs,
                    "shuffle_buffer": args.flux_shuffle_buffer})
        readers = r["readers"]
        rchar = sum(x["rchar"] for x in readers)
        r["bytes_read_per_example"] = rchar / r["samples"]
        r["device_bytes_read_per_example"] = sum(x["read_bytes"] for x in readers) / r["samples"]
        r["read_over_used_xu"] = r["bytes_read_per_example"] / used["xu"]
        r["read_over_used_xu_cond"] = r["bytes_read_per_example"] / (used["xu"] + used["cond"])
        r["peak_rss_per_reader_mb"] = [x["peak_rss_mb"] for x in readers]
        runs[f"w{w}"] = r
    return {
        "format": fmt, "storage_dtype": args.dtype, "dataset": display_path(url), "samples": n, "shard_size": spec.shard_size,
        "latent_shape": list(spec.latent_shape), "steps": spec.steps, "batch": args.flux_batch,
        "epochs": args.flux_epochs, "shuffle_buffer": args.flux_shuffle_buffer,
        "stored_bytes_per_sample": sum(stored.values()) / n,
        "stored_xu_bytes_per_sample": (stored.get("x", 0) + stored.get("u", 0) + stored.get("u_scale", 0)) / n,
        "stored_cond_bytes_per_sample": sum(stored.get(k, 0) for k in [*spec.cond_spec, "cond_row"]) / n,
        "used_xu_bytes_per_example": used["xu"], "used_cond_bytes_per_example": used["cond"],
        "segment_width": used["segment_width"], "runs": runs,
    }


def flux_table(results: list[dict]) -> str:
    r0 = results[0]
    mb = 1e6
    lines = [
        f"FLUX-shaped streaming (`benchmarks/loader.py`): {r0['samples']} trajectories of latent "
        f"{tuple(r0['latent_shape'])}, {r0['steps']} steps, shards of {r0['shard_size']}, batch {r0['batch']}, "
        f"{r0['epochs']} epochs, shuffle buffer {r0['shuffle_buffer']}; an example = one (sample, segment) of NFE=2; "
        f"used = 1 state + {r0['segment_width']} velocities (+ conditioning), in the storage dtype.",
        "",
        "| format | dtype | workers | examples/s | read MB/example | used MB/example (x+u / +cond) | read / used (x+u) | "
        "stored MB/sample | peak RSS MB per reader (start) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        for name, r in res["runs"].items():
            rss = ", ".join(f"{x['peak_rss_mb']:.0f} ({x['rss_start_mb']:.0f})" for x in r["readers"])
            lines.append(
                f"| {res['format']} | {res['storage_dtype']} | {name[1:]} | {r['samples_per_s']:.2f} | "
                f"{r['bytes_read_per_example'] / mb:.1f} | {res['used_xu_bytes_per_example'] / mb:.1f} / "
                f"{(res['used_xu_bytes_per_example'] + res['used_cond_bytes_per_example']) / mb:.1f} | "
                f"{r['read_over_used_xu']:.2f} | {res['stored_bytes_per_sample'] / mb:.1f} | {rss} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=("digits", "flux"), default=["digits", "flux"])
    parser.add_argument("--format", nargs="+", choices=("v1", "v2"), default=["v1"], dest="formats")
    parser.add_argument("--dtype", default="float16", help="storage dtype of the streamed data")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--shards", type=int, default=4, help="shards in the 1x dataset (10x gets ten times as many)")
    parser.add_argument("--flux-batch", type=int, default=1)
    parser.add_argument("--flux-epochs", type=int, default=2)
    parser.add_argument("--flux-shuffle-buffer", type=int, default=8)
    parser.add_argument("--rewrite", action="store_true", help="re-encode the cached FLUX-shaped datasets")
    parser.add_argument("--_child", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        print(json.dumps(stream_epoch(**json.loads(args._child))))
        return
    torch.set_num_threads(2)
    RESULTS.mkdir(exist_ok=True)
    if "digits" in args.parts:
        results = [digits_part(args, fmt) for fmt in args.formats]
        (RESULTS / "loader.json").write_text(json.dumps(results[0] if len(results) == 1 else {"by_format": results}, indent=2))
        table = digits_table(results)
        (RESULTS / "loader.md").write_text(table + "\n")
        print(table)
    if "flux" in args.parts:
        results = [flux_part(args, fmt) for fmt in args.formats]
        (RESULTS / "loader_flux_shaped.json").write_text(json.dumps({"by_format": results}, indent=2) + "\n")
        table = flux_table(results)
        (RESULTS / "loader_flux_shaped.md").write_text(table + "\n")
        print(table)


if __name__ == "__main__":
    main()
