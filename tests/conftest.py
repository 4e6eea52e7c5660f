import sys
from pathlib import Path

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
