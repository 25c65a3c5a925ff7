"""The scale ladder's language models: transformers classes built from configs, seeded.

Nothing is downloaded: each :class:`~.settings.LadderSpec` names a transformers family and
the keyword arguments of its config, and the model gets a seeded random init, built
directly on the device in its dtype (or on the meta device, only to count parameters).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from .settings import LadderSpec

__all__ = ["build_lm", "count_parameters"]


def _lm_classes(family: str) -> tuple[Any, Any]:
    import transformers  # optional: the hf extra

    transformers.utils.logging.set_verbosity_error()
    return {
        "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    }[family]


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """torch's default dtype set to ``dtype`` inside the block, restored after it."""
    with contextlib.ExitStack() as restore:
        restore.callback(torch.set_default_dtype, torch.get_default_dtype())
        torch.set_default_dtype(dtype)
        yield


def count_parameters(spec: LadderSpec) -> int:
    """Parameters of ``spec``'s model, counted on the meta device (nothing allocated)."""
    config_cls, model_cls = _lm_classes(spec.family)
    with torch.device("meta"):
        model = model_cls(config_cls(**spec.config))
    return sum(p.numel() for p in model.parameters())


def build_lm(spec: LadderSpec, device: torch.device, seed: int) -> torch.nn.Module:
    """``spec``'s model with a seeded random init, built directly on ``device`` in its dtype.

    The global RNG (CPU and the device's) is forked and restored: building changes no caller
    state. On a CUDA device the weights are drawn by the device's generator, so the same
    seed gives the same model on the same kind of device.
    """
    config_cls, model_cls = _lm_classes(spec.family)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device), \
            _default_dtype(spec.dtype):
        torch.manual_seed(seed)
        model = model_cls(config_cls(**spec.config))
    return model.eval()
