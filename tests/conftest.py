"""Shared pytest configuration: deterministic seeds and a quiet, single-threaded torch."""

import os
import warnings

import pytest
import torch

# Tests run with pytest-xdist on 2 cores: one intra-op thread per worker.
torch.set_num_threads(int(os.environ.get("LR_QUANT_TEST_THREADS", "1")))
warnings.filterwarnings("ignore", message=".*fast_hadamard_transform.*")


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
