import subprocess
import sys

import pytest

from arcflow.cli.app import package_version

ARCFLOW = [sys.executable, "-m", "arcflow.cli"]


def run(*args):
    return subprocess.run([*ARCFLOW, *args], capture_output=True, text=True, timeout=120)


def test_help_lists_the_tool():
    res = run("--help")
    assert res.returncode == 0
    assert "ArcFlow" in res.stdout and "--version" in res.stdout


def test_version():
    res = run("--version")
    assert res.returncode == 0
    assert res.stdout.strip() == f"arcflow {package_version()}"


@pytest.mark.parametrize("args", [("--no-such-flag",), ("no-such-command",)])
def test_bad_usage_is_one_line_exit_2(args):
    res = run(*args)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("arcflow: error:"), res.stderr
