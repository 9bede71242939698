"""The quantizer tests run torch on one thread: they are many small ops, and on a busy 2-core
machine torch's worker threads spin waiting for each other (measured here: a 1.5M-weight RTN
took 1.26 s on 2 threads against 13 ms on one). Results do not depend on the thread count."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
