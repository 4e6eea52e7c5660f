"""The ``arcflow`` command line: a thin typer layer over the pipeline, storage and distill packages."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Optional, Sequence

import typer
from typer.exceptions import TyperException


from arcflow.core.errors import one_line
from arcflow.core.quiet import quiet_libraries
from arcflow.core.signals import handle_stop_signals, received_sigterm

from . import dataset_commands, distill_commands, evaluate_commands, teacher_commands
from .errors import TRACEBACK_ENV, describe

app = typer.Typer(
    name="arcflow",
    help="Distill flow-matching text-to-image models into 2-step ArcFlow generators.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def package_version() -> str:
    try:
        return version("arcflow")
    except PackageNotFoundError:  # running from a source tree without installing
        return "0+unknown"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"arcflow {package_version()}")
        raise typer.Exit()


@app.callback()
def root(
    show_version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help=f"Log debug messages and show full tracebacks (also: {TRACEBACK_ENV}=1)."
    ),
) -> None:
    """Distill flow-matching text-to-image models into 2-step ArcFlow generators."""
    if verbose:
        os.environ[TRACEBACK_ENV] = "1"
    else:  # library notices that say nothing about the user's job (they come back with --verbose)
        quiet_libraries()
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


# Explicit registration: `typer.main.get_command(app)` lists every subcommand once this module is imported.
app.command("generate-trajectories")(dataset_commands.generate_trajectories_command)
app.command("inspect")(dataset_commands.inspect_command)
app.command("verify")(dataset_commands.verify_command)
app.command("distill")(distill_commands.distill_command)
app.command("evaluate")(evaluate_commands.evaluate_command)
app.command("sample")(teacher_commands.sample)
app.command("train-teacher")(teacher_commands.train_teacher)


#: Exit statuses of a stopped job: 128 + the signal's number, as a shell reports it.
INTERRUPTED_STATUS, TERMINATED_STATUS = 130, 143


def _command_name(args: Sequence[str]) -> Optional[str]:
    """The subcommand in ``args``: the first word that is not a root option."""
    return next((a for a in args if not a.startswith("-")), None)


def _resumable(command: Any, args: Sequence[str]) -> bool:
    """Whether the subcommand in ``args`` has ``--resume`` (the advice after a stop may name it)."""
    name = _command_name(args)
    sub = getattr(command, "commands", {}).get(name) if name is not None else None
    return sub is not None and any(p.name == "resume" for p in sub.params)


def _stopped(resumable: bool) -> None:
    """The one line and exit status of a job stopped by Ctrl-C or SIGTERM."""
    what, code = ("terminated", TERMINATED_STATUS) if received_sigterm() else ("interrupted", INTERRUPTED_STATUS)
    _fail(f"{what}; rerun the same command with --resume to continue" if resumable else what, code)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console-script entry point: user errors become one line on stderr and exit status 2; Ctrl-C
    and SIGTERM one line and 130 / 143."""
    handle_stop_signals()
    command = typer.main.get_command(app)
    args = list(sys.argv[1:] if argv is None else argv)
    resumable = _resumable(command, args)
    try:
        result = command.main(args=args, prog_name="arcflow", standalone_mode=False)
    except TyperException as exc:  # usage errors from the (vendored) click parser
        if type(exc).__name__ == "NoArgsIsHelpError":
            ctx = getattr(exc, "ctx", None)
            typer.echo(ctx.get_help() if ctx is not None else "see 'arcflow --help'")
            sys.exit(0)
        ctx = getattr(exc, "ctx", None)
        where = f"arcflow {ctx.info_name}" if ctx is not None and ctx.parent is not None else "arcflow"
        _fail(f"{exc.format_message()} (see '{where} --help')", getattr(exc, "exit_code", 2))
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        _stopped(resumable)
    except Exception as exc:  # the CLI boundary: every failure is one line (see cli/errors.py)
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            traceback.print_exc()
        _fail(describe(exc, resumable), 2)
    if result == INTERRUPTED_STATUS:  # typer turns Ctrl-C (and SIGTERM) into Exit(130), returned without a word
        _stopped(resumable)
    sys.exit(result if isinstance(result, int) else 0)


def _fail(message: str, code: int) -> None:
    typer.echo(f"arcflow: error: {one_line(message)}", err=True)
    sys.exit(code)
