"""benchmarks/storage_bytes.py: the format-agnostic byte count and the v1 path, on a few synthetic samples."""

import json

import storage_bytes


def test_uncompressed_float32_is_raw_size_and_float16_half(tmp_path):
    out = tmp_path / "sb.json"
    assert storage_bytes.main(["--samples", "8", "--shard-size", "4", "--format", "v1", "--dtypes", "float32", "float16",
                               "--compressions", "none", "--label", "t", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    rows = {row["storage_dtype"]: row for row in r["results"]}
    assert rows["float32"]["xu_ratio_vs_raw_f32"] == 1.0 and rows["float32"]["x_rel_rms_err"] == 0.0
    assert rows["float16"]["xu_ratio_vs_raw_f32"] == 0.5 and 0 < rows["float16"]["u_rel_rms_err"] < 1e-3
    assert rows["float32"]["format"] == "v1" and out.with_suffix(".md").is_file()


def test_v2_keyframes_and_float8_velocities(tmp_path):
    out = tmp_path / "sb.json"
    assert storage_bytes.main(["--samples", "8", "--shard-size", "4", "--format", "v1", "v2", "--dtypes", "float16",
                               "float8_e4m3", "--compressions", "none", "--label", "t", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    rows = {(row["format"], row["storage_dtype"]): row for row in r["results"]}
    assert set(rows) == {("v1", "float16"), ("v2", "float16"), ("v2", "float8_e4m3")}  # v1 has no float8
    raw = rows["v1", "float16"]["raw_f32_xu_bytes_per_traj"]  # (51 + 50) states of 16 x 4 float32
    per_state = 16 * 4
    # uncompressed: 11 keyframes + 50 velocities (+ a 4-byte CRC32C per chunk in v2)
    assert rows["v2", "float16"]["keyframe_every"] == 5
    assert abs(rows["v2", "float16"]["xu_bytes_per_traj"] - (11 + 50) * per_state * 2) < 20
    f8 = (11 * per_state * 2 + 50 * per_state + 50 * 4) / raw  # float16 keyframes, 1-byte u, a scale per step
    assert abs(rows["v2", "float8_e4m3"]["xu_ratio_vs_raw_f32"] - f8) < 0.01
    assert rows["v2", "float8_e4m3"]["u_rel_rms_err"] < 0.05 and rows["v2", "float16"]["x_rel_rms_err"] < 1e-3


def test_formats_table_puts_sources_side_by_side(tmp_path):
    out = tmp_path / "sb.json"
    storage_bytes.main(["--samples", "4", "--format", "v2", "--dtypes", "float16", "--compressions", "none",
                        "--label", "t", "--out", str(out)])
    r = json.loads(out.read_text())
    runs = [({**r, "label": label}, r["results"]) for label in ("digits", "flux_shaped")]
    text = storage_bytes.formats_table(runs)
    assert "| digits: x + u | digits: vs raw f32 | digits: cond | FLUX-shaped: x + u |" in text
    assert "| v2 | float16 |" in text and "(bar: <= 0.30)" in text
