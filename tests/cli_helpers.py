"""Shared helpers for CLI tests: the environment for subprocesses, CLI runners and the one-line-error checks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

#: Settings every CLI subprocess gets on top of the environment.
CLI_SETTINGS = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
#: The environment at import, with ``CLI_SETTINGS``.
CLI_ENV = {**os.environ, **CLI_SETTINGS}


def cli_env() -> dict[str, str]:
    """The environment NOW, with ``CLI_SETTINGS``: what a fixture set after import (e.g. the S3
    endpoint of tests/object_store.py) reaches the subprocess too. Without the quiet defaults an
    in-process CLI run left in ``os.environ`` (``core/quiet.py``): a user's shell has none of them,
    and the subprocess sets them itself unless ``--verbose``."""
    from arcflow.core.quiet import QUIET_ENVIRONMENT

    return {**{k: v for k, v in os.environ.items() if k not in QUIET_ENVIRONMENT}, **CLI_SETTINGS}


def run_in_process(capture, *args):
    """``arcflow ARGS`` through the console entry point in this process: (exit status, stdout, stderr).

    ``capture`` is pytest's ``capsys`` or ``capfd``; running in-process reuses a module's Ray.
    """
    from arcflow.cli.app import main

    capture.readouterr()
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    out, err = capture.readouterr()
    return info.value.code, out, err


def assert_one_line_error(code, err, *fragments) -> str:
    """Exit status 2, no traceback, exactly one stderr line ``arcflow: error: ...`` naming the fragments."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("arcflow: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def run_subprocess(*args, timeout: int = 600, cwd=None,
                   env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m arcflow.cli ARGS`` in a fresh process (what a user's shell runs), in ``cwd``, with
    ``env`` on top of :func:`cli_env`."""
    return subprocess.run([sys.executable, "-m", "arcflow.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={**cli_env(), **(env or {})})


def run_arcflow(*args, cwd, timeout: int = 600, pythonpath=()) -> subprocess.CompletedProcess:
    """``run_subprocess`` that must succeed (exit status 0; a failure shows the tails of its output),
    unbuffered, with ``pythonpath`` (folders) as PYTHONPATH when given."""
    env = {"PYTHONUNBUFFERED": "1", **({"PYTHONPATH": os.pathsep.join(pythonpath)} if pythonpath else {})}
    result = run_subprocess(*args, timeout=timeout, cwd=cwd, env=env)
    assert result.returncode == 0, f"{args[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def assert_process_failed_one_line(res: subprocess.CompletedProcess, *fragments) -> str:
    """``assert_one_line_error`` for a finished subprocess."""
    return assert_one_line_error(res.returncode, res.stderr, *fragments)


def raises_one_line(fn, *fragments) -> str:
    """``fn()`` raises an ``ArcflowError`` whose message is one line naming the fragments; the message."""
    from arcflow.core.errors import ArcflowError

    with pytest.raises(ArcflowError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message and all(f in message for f in fragments), message
    return message
