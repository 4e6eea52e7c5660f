
import pytest
from arcflow.cli.app import package_version
from cli_helpers import assert_process_failed_one_line
from cli_helpers import run_subprocess as run


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
    assert_process_failed_one_line(run(*args))
