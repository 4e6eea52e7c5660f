"""What `arcflow inspect` reports about a dataset: a JSON-able summary and a per-step table."""

from __future__ import annotations

from typing import Any

from .reader import TrajectoryReader


def dataset_summary(reader: TrajectoryReader) -> dict[str, Any]:
    """Counts, bytes, sampler settings and per-step mean curvature / velocity size of committed data.
    The header is first checked against the first committed shard's arrays and index (one line,
    advising verify, when they disagree)."""
    spec = reader.spec
    committed = sorted(reader.committed_shards())
    if committed:  # dataset.json is printed below only if a shard's arrays agree with it
        reader.shard(committed[0])
    uncommitted = sorted(reader.uncommitted_shards())
    sizes = reader.bytes_on_disk()
    samples = int(sizes.get("samples", 0))
    index = reader.index(columns=["step", "sigma", "u_cos_prev", "u_rms", "x_rms"])
    per_step = (
        index.groupby("step")
        .agg(sigma=("sigma", "first"), u_cos_prev=("u_cos_prev", "mean"), u_rms=("u_rms", "mean"), x_rms=("x_rms", "mean"))
        .reset_index()
    )
    return {
        "url": reader.url,
        "format_version": spec.format_version,
        "teacher": spec.teacher_id,
        "teacher_revision": spec.teacher_revision,
        "steps": spec.steps,
        "guidance": spec.guidance,
        "shift": spec.shift,
        "latent_shape": list(spec.latent_shape),
        "dtype": spec.storage_dtype,
        "keyframe_every": spec.keyframe_every,
        "compression": spec.compression,
        "samples_planned": spec.num_samples,
        "samples": samples,
        "shards_planned": spec.num_shards,
        "shards_committed": len(committed),
        "shards_uncommitted": len(uncommitted),
        "uncommitted_shard_ids": uncommitted,
        "bytes_on_disk": sizes["total"],
        "bytes_per_trajectory": sizes["total"] / samples if samples else None,
        "bytes_by_array": {k: v for k, v in sizes.items() if k not in ("total", "samples")},
        "per_step": per_step.to_dict(orient="records"),
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The human-readable form: a header block and the per-step table."""
    per_traj = summary["bytes_per_trajectory"]
    lines = [
        f"dataset        {summary['url']}  (format v{summary['format_version']})",
        f"teacher        {summary['teacher']} @ {summary['teacher_revision']}",
        f"sampler        {summary['steps']} Euler steps, guidance {summary['guidance']:g}, shift {summary['shift']:g}",
        f"latent         {tuple(summary['latent_shape'])}, stored as {summary['dtype']} ({summary['compression']}), "
        f"a state every {summary['keyframe_every']} step(s)",
        f"samples        {summary['samples']} of {summary['samples_planned']} planned",
        f"shards         {summary['shards_committed']} committed / {summary['shards_uncommitted']} uncommitted "
        f"/ {summary['shards_planned']} planned",
        f"bytes on disk  {summary['bytes_on_disk']:,}"
        + (f"  ({per_traj:,.0f} per trajectory)" if per_traj else ""),
        "",
        " step   sigma   mean u_cos_prev   mean u_rms   mean x_rms",
    ]
    for row in summary["per_step"]:
        cos = row["u_cos_prev"]
        cos_text = "      -" if cos != cos else f"{cos:7.4f}"  # NaN at step 0
        lines.append(f" {row['step']:4d}  {row['sigma']:.4f}   {cos_text:>15}   {row['u_rms']:10.4f}   {row['x_rms']:10.4f}")
    return "\n".join(lines)
