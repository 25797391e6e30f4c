import pytest
import torch


@pytest.fixture(autouse=True)
def single_cpu_thread():
    """Small networks train several times faster on one thread than on a busy shared pair
    of cores, where intra-op threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
