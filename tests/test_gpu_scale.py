"""benchmarks/gpu_scale.py: the reduced configuration runs end to end and renders its tables, on the
GPU when there is one (as the benchmark picks it), else on CPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import CLI_ENV

ROOT = Path(__file__).resolve().parents[1]
NFE_PER_STEP = {"flux": 1, "qwen": 2}  # Qwen-Image: true CFG


@pytest.mark.parametrize("families", [
    ["qwen"],
    pytest.param(["flux", "qwen"], marks=pytest.mark.slow),  # the default command's two families (~75 s here)
])
def test_reduced_run_writes_json_and_tables(tmp_path, families):
    out = tmp_path / "gpu_scale.json"
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/gpu_scale.py"), "--reduced", "--out", str(out), "--steps", "4",
         "--repeats", "1", "--builder-samples", "2", "--distill-batches", "1", "2", "--families", *families],
        capture_output=True, text=True, timeout=300, env=CLI_ENV, cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())
    cuda = torch.cuda.is_available()  # the benchmark's own choice, in a child of this environment
    assert r["device"].startswith("cpu") is not cuda, r["device"]  # the GPU's name, else "cpu (...)"
    assert r["reduced"] is True and r["all_finite"] is True
    assert list(r["families"]) == families
    for family in families:
        nfe_per_step = NFE_PER_STEP[family]
        f = r["families"][family]
        assert len(f["resolutions"]) == 2
        for row in f["resolutions"].values():
            assert row["finite"] and row["nfe_per_trajectory"] == 4 * nfe_per_step
            assert 0 < row["s_per_nfe_b1"] and 0 < row["s_per_trajectory_b1"]
        b = f["builder"]
        assert b["shards"] == 2 and b["bytes_written"] > 0 and b["ratio"] > 0 and b["storage_dtype"] == "float16"
        rows = f["distill"]["rows"]
        assert f["distill"]["k"] == 16 and f["distill"]["lora_rank"] == 256
        assert [(x["gradient_checkpointing"], x["batch"]) for x in rows] == [(True, 1), (True, 2), (False, 1), (False, 2)]
        assert all(x["s_per_step"] > 0 and not x["oom"] for x in rows)
        assert all((x["peak_gb"] > 0) if cuda else (x["peak_gb"] is None) for x in rows)  # measured on CUDA only
        assert f["student_vs_teacher"]["student_nfe"] == 2 and f["student_vs_teacher"]["speedup"] > 0
    table = out.with_suffix(".md").read_text()
    assert "REDUCED configuration" in table and "NOT a speed or memory figure" in table
    assert table.strip() in res.stdout  # the final table is printed too
    name = {"flux": "FLUX.1-dev", "qwen": "Qwen-Image"}
    for family in families:  # 2 resolutions + builder + 4 distill rows + student
        assert table.count(f"| {name[family]} |") == 2 + 1 + 4 + 1
