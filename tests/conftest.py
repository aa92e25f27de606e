"""Fixtures shared by several test files."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny steps: on a busy 2-core machine a second
    thread only adds synchronisation waits (and the trainer's subprocesses run with
    OMP_NUM_THREADS=1, so in-process runs then match them)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
