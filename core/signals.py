"""SIGTERM handled like Ctrl-C: what ``kill``, ``timeout``, systemd and Kubernetes send stops a job
the same way, with the same cleanup and one line.

:class:`Terminated` is a ``KeyboardInterrupt``, so every ``except KeyboardInterrupt`` / ``except
BaseException`` cleanup (a run that never checkpointed, a dataset no shard committed) runs for it
too; the CLI tells the two apart only to word its line and pick the exit status (130 or 143), by
:func:`received_sigterm` (libraries on the way up may turn the exception into another: typer makes
every ``KeyboardInterrupt`` an ``Exit(130)``).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Optional

_sigterm_received = threading.Event()


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM (raised in the main thread, like Ctrl-C's KeyboardInterrupt)."""


def terminated() -> Terminated:
    """The exception for a SIGTERM that reached this process (also one another handler caught)."""
    _sigterm_received.set()
    return Terminated(f"received signal {int(signal.SIGTERM)}")


def _raise_terminated(signum: int, frame: Optional[FrameType]) -> None:
    raise terminated()


def received_sigterm() -> bool:
    """Whether SIGTERM stopped this process since the handlers were installed."""
    return _sigterm_received.is_set()


def handle_stop_signals() -> None:
    """Ctrl-C raises ``KeyboardInterrupt`` and SIGTERM :class:`Terminated` in the main thread.

    Called at start-up and again after ``ray.init``: Ray's core worker installs its own handlers,
    which end the driver at once (SIGINT with status 130 and no word, SIGTERM with a C++ stack dump),
    skipping the CLI's message and the job's own cleanup. Does nothing outside the main thread.
    """
    if threading.current_thread() is threading.main_thread():
        _sigterm_received.clear()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _raise_terminated)
