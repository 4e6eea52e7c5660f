"""Ray start-up, written once for every job that runs on Ray (generation, distillation, benchmarks).

A job either joins ``--ray-address`` or starts an embedded local cluster, quietly: Ray's own INFO
lines ("Started a local Ray instance.") would otherwise precede a user error on stderr. After
``ray.init`` Ctrl-C is handed back to Python (:func:`~arcflow.core.driver_watch.restore_ctrl_c`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator, Optional

from .driver_watch import restore_ctrl_c
from .errors import ArcflowError


def check_local_workers(flag: str, workers: int, ray_address: Optional[str]) -> None:
    """A local Ray cluster (no ``--ray-address``) gets at most one worker per core: more would
    load one model copy each on a machine that cannot run them."""
    cores = os.cpu_count() or 1
    if ray_address is None and workers > cores:
        raise ArcflowError(f"{flag} {workers} exceeds this machine's {cores} cores; join a cluster with --ray-address")


def start_ray(address: Optional[str] = None, num_cpus: Optional[int] = None) -> bool:
    """Join ``address`` or start a local cluster of ``num_cpus`` CPUs (default: this machine's cores);
    returns whether this call started a cluster (and so should shut it down). Does nothing when Ray
    is already initialised in this process (tests, notebooks)."""
    import ray

    if ray.is_initialized():
        return False
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    if address:
        ray.init(address=address, **quiet)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, **quiet)
    restore_ctrl_c()
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
