import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """Tiny matmuls run faster on one thread than two, on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
