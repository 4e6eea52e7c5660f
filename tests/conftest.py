import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).parent))
# The stand-in teachers (latency_sim, random_teachers) live with the benchmarks; appended, so no
# benchmark module can shadow an installed one.
sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """8x8 digits: one intra-op thread is fastest, and on a busy 2-core machine a second thread
    spin-waiting against other processes makes sampling 10-50x slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def start_local_ray() -> str:
    """Start the shared in-process local Ray instance unless Ray is running; returns its GCS address.

    As many CPUs as the machine has, so a job started in this process (which joins a running Ray)
    gets what the local cluster it would start itself would have.
    """
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    return ray.get_runtime_context().gcs_address


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for every test that drives Ray in this process, shut down at the end."""
    import ray

    start_local_ray()
    yield
    ray.shutdown()


@pytest.fixture
def local_ray(ray_session) -> str:
    """The shared local Ray instance's GCS address (for a driver subprocess to join)."""
    return start_local_ray()


@contextlib.contextmanager
def _shared_ray_paused() -> Iterator[None]:
    """No in-process Ray for a while; the shared instance, if it was running, is started again after."""
    import ray

    running = ray.is_initialized()
    ray.shutdown()
    try:
        yield
    finally:
        ray.shutdown()
        if running:
            start_local_ray()


@pytest.fixture
def own_ray():
    """For a test whose job starts (and stops) its own local Ray cluster, as it does from the shell."""
    with _shared_ray_paused():
        yield


@pytest.fixture
def two_node_ray():
    """A two-node ``ray.cluster_utils.Cluster`` (1 CPU each) joined by this process; yields the cluster."""
    import ray
    from ray.cluster_utils import Cluster

    with _shared_ray_paused():
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        try:
            cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, log_to_driver=False)
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()
