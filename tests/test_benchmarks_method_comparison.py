"""benchmarks/method_comparison.py --quick: every row of the offline vs on-policy table, with the
teacher evaluations each spent, written as JSON, markdown and a plot."""

import json
import sys

import method_comparison
import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow  # the benchmark's --quick smoke run (its real run is committed in benchmarks/results)
def test_quick_comparison_has_every_row_and_the_teacher_evals(tmp_path, monkeypatch):
    results = tmp_path / "results"
    monkeypatch.setattr(sys, "argv", ["method_comparison.py", "--quick", "--work", str(tmp_path / "work"),
                                      "--results", str(results)])
    method_comparison.main()
    table = (results / "method_comparison.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| regime"))
    assert "teacher evals" in header and "PSNR vs teacher" in header and "FD vs teacher" in header
    assert "convergence" in header and "wall" in header
    for regime in method_comparison.REGIMES:
        for student in method_comparison.STUDENTS:
            for method in method_comparison.METHODS:
                assert f"| {regime} | {student} | {method} |" in table, (regime, student, method)
    data = json.loads((results / "method_comparison.json").read_text())
    for regime in data["regimes"]:
        rows = {(r["student"], r["method"]): r for r in regime["rows"]}
        assert len(rows) == len(method_comparison.STUDENTS) * len(method_comparison.METHODS)
        for row in rows.values():
            assert all(isinstance(r["teacher_evals"], int) and r["teacher_evals"] > 0 for r in row["runs"])
        # the polish spends half the dataset plus its own rollouts; on-policy only its rollouts
        polish = rows[("ArcFlow K", "polish")]["runs"][0]["teacher_evals"]
        offline = rows[("ArcFlow K", "offline")]["runs"][0]["teacher_evals"]
        on_policy = rows[("ArcFlow K", "on-policy")]["runs"][0]["teacher_evals"]
        assert polish == offline // 2 + on_policy // 2
    assert (results / "method_comparison.png").stat().st_size > 0
