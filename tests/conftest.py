"""Shared test set-up."""

import pytest
import torch
from tiny_models import tiny_resnet

from hdrq_plugin import register_architecture

# the tests' own model, allowed the way a user allows theirs: checkpoints may only name registered builders
register_architecture(tiny_resnet)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The test models are tiny and overhead-bound: a second thread only adds contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
