"""Ray start-up, written once for every job that runs on Ray (generation, distillation, benchmarks).

A job either joins ``--ray-address`` or starts an embedded local cluster, quietly: Ray's own INFO
lines ("Started a local Ray instance.") would otherwise precede a user error on stderr, and the
errors Ray forwards from its workers (task failures, worker tracebacks, "(raylet) ..." blocks on
stdout) come back only with ``--verbose``: the CLI's one line says what failed. What Ray cannot do
is refused before it starts: an address where no cluster answers (``ray.init`` would retry for
minutes), GPUs the machine or cluster does not have (Ray would wait for them forever). After
``ray.init`` Ctrl-C and SIGTERM are handed back to Python (:func:`~arcflow.core.signals.handle_stop_signals`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
from typing import Any, Iterator, Optional

from .errors import ArcflowError, first_line, quote, verbose
from .signals import handle_stop_signals, terminated

#: How long the probe of ``--ray-address`` waits for a TCP connection.
PROBE_TIMEOUT_S = 5.0
#: ``ray.init`` addresses that name no host to probe.
_SPECIAL_ADDRESSES = ("auto", "local")


def check_local_workers(flag: str, workers: int, ray_address: Optional[str]) -> None:
    """A local Ray cluster (no ``--ray-address``) gets at most one worker per core: more would
    load one model copy each on a machine that cannot run them."""
    cores = os.cpu_count() or 1
    if ray_address is None and workers > cores:
        raise ArcflowError(f"{flag} {workers} exceeds this machine's {cores} cores; join a cluster with --ray-address")


def check_local_gpus(flag: str, needed: int) -> None:
    """Refuse at once a local job that needs ``needed`` CUDA GPUs this machine (as torch sees it)
    does not have: Ray would wait for them forever."""
    import torch

    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if needed > available:
        have = "no CUDA GPU" if available == 0 else f"only {available} CUDA GPU(s)"
        raise ArcflowError(f"{flag} needs {needed} GPU(s) but this machine has {have}; "
                           "run on the CPU or join a cluster with GPUs via --ray-address")


def check_cluster_gpus(flag: str, needed: float) -> None:
    """After Ray started: refuse a job that needs more GPUs than the cluster has in all."""
    import ray

    available = ray.cluster_resources().get("GPU", 0)
    if needed > available:
        raise ArcflowError(f"{flag} needs {needed:g} GPU(s) but the Ray cluster has {available:g}; "
                           "run on the CPU or add GPU nodes")


def check_device(flag: str, device: str, ray_address: Optional[str]) -> None:
    """A torch device string that parses, and (for a local job) that this machine has."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ArcflowError(f"{flag} {quote(device)} is not a torch device (cpu, cuda, cuda:N, mps)") from None
    if ray_address is not None:
        return  # the cluster's GPUs are checked once it is reached
    if parsed.type == "cuda":
        check_local_gpus(f"{flag} {device}", (parsed.index or 0) + 1)
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ArcflowError(f"{flag} {device}: this machine has no MPS device; run on the CPU")


def check_ray_address(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Refuse, within ``timeout_s``, an address where nothing accepts a connection: a host that does
    not resolve, a closed port, no answer. ``ray.init`` would retry it for minutes with a line per try."""
    if address in _SPECIAL_ADDRESSES:
        return
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ArcflowError(f"--ray-address {quote(address)} is not HOST:PORT (e.g. 10.0.0.1:6379)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except socket.gaierror:
        raise ArcflowError(f"--ray-address {quote(address)}: unknown host {quote(host)}") from None
    except OSError as exc:
        reason = exc.strerror or first_line(exc)
        raise ArcflowError(
            f"--ray-address {quote(address)}: no Ray cluster answers there ({reason}); check the address and "
            "that the cluster is up (`ray status` on its head node)"
        ) from None


def _hide_worker_errors() -> None:
    """Ray's driver prints every error its workers publish ("(raylet) ..." lines, whole tracebacks)
    on stdout from a thread of its own, even with ``log_to_driver=False``: keep them for ``--verbose``.
    The printer is looked up at each message, so replacing it takes effect at once."""
    from ray._private import worker

    shown = worker.print_to_stdstream
    if getattr(shown, "arcflow_filter", False):
        return

    def print_when_verbose(data: Any, ignore_prefix: bool) -> None:
        if verbose():
            shown(data, ignore_prefix)

    print_when_verbose.arcflow_filter = True  # type: ignore[attr-defined]
    worker.print_to_stdstream = print_when_verbose


def start_ray(address: Optional[str] = None, num_cpus: Optional[int] = None) -> bool:
    """Join ``address`` or start a local cluster of ``num_cpus`` CPUs (default: this machine's cores);
    returns whether this call started a cluster (and so should shut it down). Does nothing when Ray
    is already initialised in this process (tests, notebooks)."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        check_ray_address(address)
    if not verbose():
        os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")  # "Unhandled error" lines on stderr
        _hide_worker_errors()
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    try:
        if address:
            ray.init(address=address, **quiet)
        else:
            ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, **quiet)
    except SystemExit as exc:  # SIGTERM during ray.init: Ray's own handler calls sys.exit(15)
        if exc.code != signal.SIGTERM:
            raise
        ray.shutdown()
        raise terminated() from None
    handle_stop_signals()
    return not address


@contextlib.contextmanager
def ray_session(address: Optional[str] = None, num_cpus: Optional[int] = None) -> Iterator[None]:
    """:func:`start_ray` for the duration of a ``with`` block; a cluster it started is shut down after."""
    import ray

    started = start_ray(address, num_cpus)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
