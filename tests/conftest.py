"""Shared pytest configuration.

GPU tests skip without CUDA, HF tests without transformers. The suite runs torch on one
thread: the models under test are tiny, and two torch threads fighting numpy's on a 2-core
machine made some tests up to 100x slower (measured).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    no_cuda = pytest.mark.skip(reason="needs CUDA (gpu marker); none on this machine")
    no_hf = pytest.mark.skip(reason="needs transformers (pip install curvops[hf])")
    has_hf = importlib.util.find_spec("transformers") is not None
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_cuda)
        if "hf" in item.keywords and not has_hf:
            item.add_marker(no_hf)


@pytest.fixture(scope="session", autouse=True)
def single_torch_thread():
    """One torch thread for the whole session, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
