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
