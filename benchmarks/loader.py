"""Streaming loader benchmarks: digits-shaped throughput vs the trainer and RSS with 1x vs 10x the
shards; FLUX-shaped examples/s, bytes read per example vs bytes the loss uses, peak RSS per worker.

    .venv/bin/python benchmarks/loader.py                 # both parts: prints tables, writes benchmarks/results/
                                                          #   loader.json/.md and loader_flux_shaped.json/.md
    .venv/bin/python benchmarks/loader.py --parts flux    # issue 12's FLUX-shaped figure only
    .venv/bin/python benchmarks/loader.py --parts flux --flux-configs v1:float16 v2:float16 v2:float8_e4m3

Every run streams arcflow's ``TrajectoryStream`` (``segment_bounds=[0, 25, 50]``: NFE=2 items, one per
(sample, segment)), whatever format the data is in (the reader handles v1 and v2), through a
``DataLoader`` in a fresh process. A "config" is ``FORMAT:DTYPE``: ``v1`` data is written by the frozen
benchmarks/v1_writer.py, ``v2`` by the product writer (blosc-zstd, keyframes every 5 steps).

Digits part (``loader.json``, ``--digits-configs``, default ``v2:float16``):

* loader throughput: examples/s that the stream + a DataLoader deliver (one shuffled epoch) with 0
  and 2 workers, on trajectory-shaped random data like the digits teacher's (50 steps, latent 16x4);
* trainer consumption: examples/s one training step of the default student (K=8, LoRA r=16) on the
  embedded digits teacher consumes (forward + backward + AdamW, batch 64), measured in this process;
* peak RSS (``VmHWM``) of the main process and of each worker, streaming one epoch of a dataset with
  1x and with 10x the shards (same shard size): it should not grow with the dataset.

FLUX-shaped part (``loader_flux_shaped.json``, ``--flux-configs``, default ``v1:float16 v2:float16
v2:float8_e4m3``): the 24 cached FLUX-shaped float32 trajectories of benchmarks/flux_shaped_data.py
(4096 tokens x 64, 50 steps, T5 512x4096 conditioning) cycled into ``--flux-shards`` shards of
``--flux-shard-samples`` samples (default 2 x 54: about 1.5 GB per v2 float16 shard; every copy has
its own sample id and seed; same sample count per shard for every config), re-encoded once per
config into ``benchmarks/.cache/flux_shaped/<format>_<dtype>_<shards>x<samples>``. Each run streams
``--flux-epochs`` epochs with 0 and with 2 DataLoader workers, from a cold page cache (the dataset's
pages are dropped before each run with ``posix_fadvise(DONTNEED)``; ``--warm`` keeps them). Per run:
examples/s; per reading process (each worker, or the main process without workers) the bytes it
read (``/proc/<pid>/io`` ``rchar``: every read() whether from disk or page cache; ``read_bytes``:
from the device) and its peak RSS (``VmHWM``; a worker's includes the pages it shares with the parent
since the fork, so its RSS at the start is given too). "Used" bytes are what the NFE=2 loss reads of
one example: one state and 25 velocities of the latent in the storage dtype (float8: 1-byte
velocities + per-step scales, float16 state); the conditioning it uses is listed separately.
"""

from __future__ import annotations

import argparse
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

# Before torch loads OpenMP: on a shared CPU, spinning OpenMP threads that lose their core slow the
# trainer step down up to 10x (docs/benchmarks.md, "Trajectory builder"); children inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # v1_writer, storage_bytes, flux_shaped_data

RESULTS = Path(__file__).parent / "results"
BENCH_ROOT = Path(__file__).resolve().parent.parent  # what display_path's paths are relative to
STEPS, LATENT, SHARD = 50, (16, 4), 500
MACHINE = "2-core CPU VM, shared"
#: NFE=2 over 50 recorded steps: the student's two segments.
SEGMENT_BOUNDS = [0, 25, 50]


# -- data -------------------------------------------------------------------------------------


def write_synthetic(url: Path, shards: int, fmt: str = "v1", dtype: str = "float16") -> None:
    """Trajectory-shaped random data through the ``fmt`` writer (``dtype``, compressed)."""
    from storage_bytes import open_writer

    from arcflow.pipeline.sigmas import shifted_schedule

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


def replicated_source(url: str, shard_samples: int, shards: int):
    """The trajectories of dataset ``url`` cycled into ``shards`` shards of ``shard_samples`` samples
    (float32, a ``storage_bytes.Source``): sample ``g`` is source sample ``g % n`` under its own sample
    id and seed ``g``. Each shard is assembled from one source shard at a time."""
    from storage_bytes import Source, display_path

    from arcflow.storage import open_dataset

    r = open_dataset(url)
    spec = r.spec
    sizes = sorted(r.shard_sizes().items())
    index = r.index(columns=["shard", "row", "step", "prompt"])
    first = index[index["step"] == 0].sort_values(["shard", "row"])
    prompts = first["prompt"].tolist()
    n_src = len(prompts)
    lat, S = spec.latent_shape, spec.steps

    def shards_fn():
        for s in range(shards):
            g = np.arange(s * shard_samples, (s + 1) * shard_samples)
            src = g % n_src
            x = np.empty((len(g), S + 1, *lat), np.float32)
            u = np.empty((len(g), S, *lat), np.float32)
            cond = {k: np.empty((len(g), *f.shape), np.float32 if f.is_floating else f.dtype)
                    for k, f in spec.cond_spec.items()}
            guidance = np.empty(len(g), np.float32)
            offset = 0
            for shard, size in sizes:
                here = np.nonzero((src >= offset) & (src < offset + size))[0]
                if len(here):
                    d = r.read_shard(shard)
                    rows = src[here] - offset
                    x[here], u[here], guidance[here] = d["x"][rows], d["u"][rows], d["guidance"][rows]
                    for k in cond:
                        cond[k][here] = d[k][rows]
                    del d
                offset += size
            yield dict(shard_id=s, x=x, u=u, sigmas=np.asarray(spec.sigmas), cond=cond, sample_ids=g, seeds=g,
                       prompts=[prompts[i] for i in src], guidance=guidance)
            del x, u, cond

    per_shard = [len({prompts[i] for i in np.arange(s * shard_samples, (s + 1) * shard_samples) % n_src})
                 for s in range(shards)]
    return Source(f"{display_path(url)} cycled into {shards} x {shard_samples}", lat, spec.sigmas,
                  {k: (f.shape, f.dtype) for k, f in spec.cond_spec.items()}, spec.guidance, [shard_samples] * shards,
                  shards_fn, stored_dtype=spec.storage_dtype, prompts_per_shard=per_shard)


def flux_dataset(fmt: str, dtype: str, shard_samples: int, shards: int, rewrite: bool = False) -> Path:
    """The FLUX-shaped trajectories as a ``fmt`` / ``dtype`` / blosc-zstd dataset of ``shards`` shards of
    ``shard_samples`` samples, cached next to the float32 source; re-encoded when the source or any
    setting changed (or ``rewrite``)."""
    import flux_shaped_data
    from storage_bytes import display_path, encode

    from arcflow.storage import open_dataset

    source = flux_shaped_data.ensure_dataset(progress=False)
    out = flux_shaped_data.CACHE / f"{fmt}_{dtype}_{shards}x{shard_samples}"
    marker = out.with_name(out.name + ".json")
    want = {"source": display_path(source), "source_fingerprint": open_dataset(str(source)).fingerprint(), "format": fmt,
            "storage_dtype": dtype, "compression": "blosc-zstd", "shard_samples": shard_samples, "shards": shards}
    if not rewrite and marker.is_file() and (out / "dataset.json").is_file():
        recorded = json.loads(marker.read_text())
        if {k: recorded.get(k) for k in want} == want:
            return out
    marker.unlink(missing_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    print(f"writing {display_path(out)} ...", flush=True)
    _, seconds = encode(replicated_source(str(source), shard_samples, shards), fmt, dtype, "blosc-zstd", out)
    marker.write_text(json.dumps({**want, "write_s": seconds}, indent=2) + "\n")
    return out


def evict_page_cache(root: Path) -> int:
    """Drop the page-cache pages of every file under ``root`` (flushed first), so the next read comes
    from the device; returns the number of files. Unprivileged: ``posix_fadvise(DONTNEED)`` per file."""
    count = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            count += 1
    return count


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
    """arcflow's ``TrajectoryStream`` over ``url`` (v1 or v2 data): one item per (sample, segment) of
    NFE=2, with x (segment-start state), sigma, sigmas, u [W, *latent], weights, segment, conditioning."""
    from arcflow.storage.streaming import TrajectoryStream

    return TrajectoryStream(url, segment_bounds=SEGMENT_BOUNDS, seed=seed, shuffle_buffer=shuffle_buffer, epochs=epochs)


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


def stream_epoch(url: str, workers: int, batch: int, epochs: int = 1, shuffle_buffer: int = 512,
                 evict: bool = False) -> dict:
    """Stream ``epochs`` epochs through the loader (``evict``: from a cold page cache); returns
    examples/s, this process's peak RSS and the per-reading-process figures of ``Measured``."""
    import zarr.api.asynchronous  # noqa: F401  (imported before the clock and before the workers fork)
    import zarr.storage  # noqa: F401

    from arcflow.storage import _io  # noqa: F401

    stream = make_stream(url, epochs=epochs, shuffle_buffer=shuffle_buffer)
    evicted = evict_page_cache(Path(url)) if evict else 0
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
    # VmHWM, not getrusage's ru_maxrss: Linux carries maxrss across execve, so a subprocess's
    # ru_maxrss is at least its parent's RSS when it was spawned.
    steady = (count - first[1]) / (seconds - first[0]) if count > first[1] and seconds > first[0] else float("nan")
    return {"examples": count, "seconds": seconds, "examples_per_s": count / seconds, "first_batch_s": first[0],
            "examples_per_s_after_first_batch": steady, "files_evicted": evicted, "load_avg": os.getloadavg(),
            "main_peak_rss_mb": _proc()["VmHWM"],
            "worker_peak_rss_mb": [r["peak_rss_mb"] for r in readers if r["worker"] >= 0], "readers": readers}


def _child(options: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--_child", json.dumps(options)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"loader child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- digits part --------------------------------------------------------------------------------


def trainer_consumption(batch: int, steps: int = 20) -> float:
    """Examples/s (one (sample, segment) each) of the default student's training step on the digits teacher (synthetic batch)."""
    from arcflow.distill.loss import segment_batch, segment_loss
    from arcflow.distill.student import StudentConfig, build_student
    from arcflow.pipeline.registry import load_teacher

    teacher = load_teacher("digits")
    student = build_student(teacher, StudentConfig(), inplace=True).train()
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


def parse_config(text: str) -> tuple[str, str]:
    """``FORMAT:DTYPE`` -> (format, dtype), checked against the format's storage dtypes."""
    from storage_bytes import format_dtypes

    fmt, _, dtype = text.partition(":")
    if fmt not in ("v1", "v2") or dtype not in format_dtypes(fmt):
        raise SystemExit(f"config {text!r}: expected v1:DTYPE or v2:DTYPE with a storage dtype of that format")
    return fmt, dtype


def digits_part(args, fmt: str, dtype: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        small, large = Path(tmp) / "x1", Path(tmp) / "x10"
        write_synthetic(small, args.shards, fmt, dtype)
        write_synthetic(large, args.shards * 10, fmt, dtype)
        runs = {f"{name}_w{w}": _child({"url": str(url), "workers": w, "batch": args.batch})
                for name, url in (("x1", small), ("x10", large)) for w in (0, 2)}
    for r in runs.values():
        r.pop("readers", None)
    consume = trainer_consumption(args.batch)
    loader_rate = max(runs["x10_w0"]["examples_per_s"], runs["x10_w2"]["examples_per_s"])
    return {
        "format": fmt,
        "storage_dtype": dtype,
        "machine": MACHINE,
        "batch": args.batch,
        "shard_size": SHARD,
        "shards_1x": args.shards,
        "segment_bounds": SEGMENT_BOUNDS,
        "runs": runs,
        "trainer_examples_per_s": consume,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "loader_over_trainer": loader_rate / consume,
        "rss_10x_over_1x_workers0": runs["x10_w0"]["main_peak_rss_mb"] / runs["x1_w0"]["main_peak_rss_mb"],
        "rss_10x_over_1x_workers2": max(runs["x10_w2"]["worker_peak_rss_mb"]) / max(runs["x1_w2"]["worker_peak_rss_mb"]),
    }


def digits_table(results: list[dict]) -> str:
    r0 = results[0]
    lines = [
        f"Digits-shaped data (`benchmarks/loader.py`): latent {LATENT}, {STEPS} steps, shards of {r0['shard_size']} "
        f"samples, 1x = {r0['shards_1x']} shards, 10x = {10 * r0['shards_1x']}; an example = one (sample, segment) "
        f"of NFE=2; batch {r0['batch']}; peak RSS = VmHWM; {MACHINE}.",
        "",
        "| data | run | examples | examples/s | peak RSS MB: main | per worker |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for res in results:
        for name, r in res["runs"].items():
            workers = ", ".join(f"{m:.0f}" for m in r["worker_peak_rss_mb"]) or "-"
            lines.append(f"| {res['format']} {res['storage_dtype']} | {name} | {r['examples']} | "
                         f"{r['examples_per_s']:.0f} | {r['main_peak_rss_mb']:.0f} | {workers} |")
    for res in results:
        lines += [
            "",
            f"{res['format']} {res['storage_dtype']}: trainer consumption (default student, batch {res['batch']}): "
            f"{res['trainer_examples_per_s']:.0f} examples/s; loader / trainer = {res['loader_over_trainer']:.1f}x "
            f"(goal >= 5x). Peak RSS 10x / 1x shards: {res['rss_10x_over_1x_workers0']:.3f} (no workers), "
            f"{res['rss_10x_over_1x_workers2']:.3f} (per worker, 2 workers) (goal: within 10%).",
        ]
    return "\n".join(lines)


# -- FLUX-shaped part ---------------------------------------------------------------------------


def flux_config(args, fmt: str, dtype: str) -> dict:
    """The config's dataset (built when missing) and its sizes; ``runs`` is filled by :func:`flux_part`."""
    from storage_bytes import array_bytes, display_path

    from arcflow.storage import open_dataset

    url = flux_dataset(fmt, dtype, args.flux_shard_samples, args.flux_shards, rewrite=args.rewrite)
    spec = open_dataset(str(url)).spec
    stored = array_bytes(url)
    shard_bytes = [sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(g) for f in fs)
                   for g in sorted((url / "shards").iterdir())]
    n = spec.num_samples
    used = used_bytes(spec.latent_shape, spec.steps, dtype, spec.cond_spec)
    return {
        "format": fmt, "storage_dtype": dtype, "dataset": display_path(url), "machine": MACHINE,
        "samples": n, "shards": spec.num_shards, "shard_size": spec.shard_size,
        "samples_per_chunk": spec.samples_per_chunk, "steps_per_chunk": getattr(spec, "steps_per_chunk", None),
        "keyframe_every": spec.keyframe_every, "stored_bytes_per_shard": shard_bytes,
        "latent_shape": list(spec.latent_shape), "steps": spec.steps, "batch": args.flux_batch,
        "epochs": args.flux_epochs, "shuffle_buffer": args.flux_shuffle_buffer, "repeats": args.flux_repeats,
        "page_cache": "warm" if args.warm else "cold",
        "stored_bytes_per_sample": sum(stored.values()) / n,
        "stored_xu_bytes_per_sample": (stored.get("x", 0) + stored.get("u", 0) + stored.get("u_scale", 0)) / n,
        "stored_cond_bytes_per_sample": sum(stored.get(k, 0) for k in [*spec.cond_spec, "cond_row"]) / n,
        "used_xu_bytes_per_example": used["xu"], "used_cond_bytes_per_example": used["cond"],
        "segment_width": used["segment_width"], "runs": {},
    }


def flux_part(args, configs: list[tuple[str, str]]) -> list[dict]:
    """Every (config, workers) run ``--flux-repeats`` times, interleaved (repeat, config, workers) so that
    a burst of load from other jobs on the shared machine does not land on one config only. Per
    (config, workers): the median examples/s (and the range), bytes read and peak RSS (worst repeat)."""
    results = [flux_config(args, *c) for c in configs]
    reps: dict[tuple[int, int], list[dict]] = {}
    for rep in range(args.flux_repeats):
        for i, res in enumerate(results):
            for w in (0, 2):
                r = _child({"url": str(BENCH_ROOT / res["dataset"]), "workers": w, "batch": args.flux_batch,
                            "epochs": args.flux_epochs, "shuffle_buffer": args.flux_shuffle_buffer, "evict": not args.warm})
                reps.setdefault((i, w), []).append(r)
                rss = ", ".join(f"{x['peak_rss_mb']:.0f}" for x in r["readers"])
                print(f"  [{rep + 1}/{args.flux_repeats}] {res['format']} {res['storage_dtype']}, {w} workers: "
                      f"{r['examples_per_s']:.2f} examples/s, read {sum(x['rchar'] for x in r['readers']) / r['examples'] / 1e6:.1f} "
                      f"MB/example, peak RSS per reader {rss} MB", flush=True)
    for (i, w), runs in reps.items():
        res = results[i]
        rates = [r["examples_per_s"] for r in runs]
        worst = max(runs, key=lambda r: max(x["peak_rss_mb"] for x in r["readers"]))
        rchar = [sum(x["rchar"] for x in r["readers"]) / r["examples"] for r in runs]
        out = {
            "examples": runs[0]["examples"], "examples_per_s": float(np.median(rates)),
            "examples_per_s_min": min(rates), "examples_per_s_max": max(rates), "examples_per_s_all": rates,
            "bytes_read_per_example": max(rchar),
            "device_bytes_read_per_example": max(sum(x["read_bytes"] for x in r["readers"]) / r["examples"] for r in runs),
            "readers": worst["readers"], "peak_rss_per_reader_mb": [x["peak_rss_mb"] for x in worst["readers"]],
            "main_peak_rss_mb": max(r["main_peak_rss_mb"] for r in runs), "repeats": runs,
        }
        out["read_over_used_xu"] = out["bytes_read_per_example"] / res["used_xu_bytes_per_example"]
        out["read_over_used_xu_cond"] = out["bytes_read_per_example"] / (
            res["used_xu_bytes_per_example"] + res["used_cond_bytes_per_example"])
        res["runs"][f"w{w}"] = out
    return results


def flux_table(results: list[dict]) -> str:
    r0 = results[0]
    mb = 1e6
    lines = [
        f"FLUX-shaped data (`benchmarks/loader.py`): the 24 cached trajectories (latent {tuple(r0['latent_shape'])}, "
        f"{r0['steps']} steps, T5 512x4096 conditioning) cycled into {r0['shards']} shards of {r0['shard_size']} "
        f"samples per config; {r0['page_cache']} page cache, local disk; batch {r0['batch']}, {r0['epochs']} epoch(s), "
        f"examples/s = median (range) of {r0['repeats']} runs, interleaved across configs; "
        f"shuffle buffer {r0['shuffle_buffer']}; an example = one (sample, segment) of NFE=2; used = 1 state + "
        f"{r0['segment_width']} velocities in the storage dtype; read = `rchar` of the reading processes; "
        f"peak RSS = VmHWM (at start in brackets); {MACHINE}.",
        "",
        "| data | GB per shard | workers | examples/s | read MB / example | used MB (x + u / + cond) | read / used | "
        "peak RSS MB per reader |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        for name, r in res["runs"].items():
            rss = ", ".join(f"{x['peak_rss_mb']:.0f} ({x['rss_start_mb']:.0f})" for x in r["readers"])
            lines.append(
                f"| {res['format']} {res['storage_dtype']} | {max(res['stored_bytes_per_shard']) / 1e9:.2f} | {name[1:]} | "
                f"{r['examples_per_s']:.2f} ({r['examples_per_s_min']:.2f}-{r['examples_per_s_max']:.2f}) | "
                f"{r['bytes_read_per_example'] / mb:.1f} | "
                f"{res['used_xu_bytes_per_example'] / mb:.1f} / "
                f"{(res['used_xu_bytes_per_example'] + res['used_cond_bytes_per_example']) / mb:.1f} | "
                f"{r['read_over_used_xu']:.2f} | {rss} |")
    lines.append("")
    lines.append("Bars: read / used <= 1.3 per NFE=2 example; peak RSS < 1 GB per loader worker with ~1.5 GB shards. "
                 "Worst per config (peak over every reading process, the main process of the 0-worker run included): " + "; ".join(
        f"{res['format']} {res['storage_dtype']}: read / used "
        f"{max(r['read_over_used_xu'] for r in res['runs'].values()):.2f}, peak RSS "
        f"{max(m for r in res['runs'].values() for m in r['peak_rss_per_reader_mb']):.0f} MB" for res in results) + ".")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=("digits", "flux"), default=["digits", "flux"])
    parser.add_argument("--digits-configs", nargs="+", default=["v2:float16"], metavar="FORMAT:DTYPE")
    parser.add_argument("--flux-configs", nargs="+", default=["v1:float16", "v2:float16", "v2:float8_e4m3"],
                        metavar="FORMAT:DTYPE")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--shards", type=int, default=4, help="shards in the 1x dataset (10x gets ten times as many)")
    parser.add_argument("--flux-batch", type=int, default=1)
    parser.add_argument("--flux-epochs", type=int, default=1)
    parser.add_argument("--flux-shuffle-buffer", type=int, default=8)
    parser.add_argument("--flux-repeats", type=int, default=3, help="runs per (config, workers); the median is reported")
    parser.add_argument("--flux-shard-samples", type=int, default=54, help="samples per FLUX-shaped shard")
    parser.add_argument("--flux-shards", type=int, default=2, help="FLUX-shaped shards per dataset")
    parser.add_argument("--warm", action="store_true", help="keep the page cache (default: drop the dataset's pages)")
    parser.add_argument("--rewrite", action="store_true", help="re-encode the cached FLUX-shaped datasets")
    parser.add_argument("--_child", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        print(json.dumps(stream_epoch(**json.loads(args._child))))
        return
    torch.set_num_threads(2)
    RESULTS.mkdir(exist_ok=True)
    digits = [parse_config(c) for c in args.digits_configs]
    flux = [parse_config(c) for c in args.flux_configs]
    if "digits" in args.parts:
        results = [digits_part(args, *c) for c in digits]
        (RESULTS / "loader.json").write_text(json.dumps({"by_config": results}, indent=2) + "\n")
        table = digits_table(results)
        (RESULTS / "loader.md").write_text(table + "\n")
        print(table)
    if "flux" in args.parts:
        results = flux_part(args, flux)
        (RESULTS / "loader_flux_shaped.json").write_text(json.dumps({"by_config": results}, indent=2) + "\n")
        table = flux_table(results)
        (RESULTS / "loader_flux_shaped.md").write_text(table + "\n")
        print(table)


if __name__ == "__main__":
    main()
