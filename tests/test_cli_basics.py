import subprocess
import sys

import pytest
from arcflow.cli.app import package_version
from cli_helpers import CLI_ENV, assert_process_failed_one_line
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


def test_help_loads_no_model_libraries():
    """`arcflow --help` stays fast: the command modules import torch, Ray and diffusers only when a command runs."""
    code = (
        "import sys\n"
        "from arcflow.cli.app import main\n"
        "try:\n"
        "    main(['generate-trajectories', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(m for m in ('torch', 'ray', 'diffusers', 'peft') if m in sys.modules))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=CLI_ENV)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]"


def test_every_subcommand_is_registered_on_import():
    """Registration is explicit in cli/app.py: importing ``app`` is enough, no ``main()`` call needed."""
    import typer
    from arcflow.cli.app import app

    assert sorted(typer.main.get_command(app).commands) == [
        "distill", "evaluate", "generate-trajectories", "inspect", "sample", "train-teacher", "verify",
    ]
