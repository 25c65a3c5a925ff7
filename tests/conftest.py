"""Shared pytest configuration: GPU tests skip without CUDA, HF tests without transformers."""

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
