"""Where things come from and go to: HF models, the scipy and cupy views, the CLI.

The HuggingFace adapter (``curvops.adapters.hf``) and the cupy view import their optional
dependencies only when used.
"""

from .array_view import view_dtype
from .cupy_view import to_cupy
from .memory import MicroBatchPlan, plan_micro_batches
from .scipy_view import ScipyView, to_scipy

_HF_NAMES = ("LanguageModelObjective", "hf_objective", "attention_product_context", "is_hf_model")


def __getattr__(name: str) -> object:
    # transformers is optional: touch curvops.adapters.hf only when one of its names is asked for.
    if name in _HF_NAMES:
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'curvops.adapters' has no attribute {name!r}")


__all__ = [
    "LanguageModelObjective",
    "MicroBatchPlan",
    "ScipyView",
    "attention_product_context",
    "hf_objective",
    "is_hf_model",
    "plan_micro_batches",
    "to_cupy",
    "to_scipy",
    "view_dtype",
]
