"""The proof: model zoo, cross-checks of every method, the validation ladder, reports, benchmarks.

Nothing in the library imports this package; the CLI and the tests do. Names are loaded on
first use so that ``import curvops.validation`` stays cheap (matplotlib is optional).
"""

import importlib

_EXPORTS = {
    "build": "zoo",
    "zoo_names": "zoo",
    "ZOO": "zoo",
    "cross_check": "crosscheck",
    "register_method": "crosscheck",
    "MethodRunner": "crosscheck",
    "MethodOutcome": "crosscheck",
    "Reference": "crosscheck",
    "METHODS": "crosscheck",
    "run_ladder": "ladder",
    "select_rungs": "ladder",
    "QUICK_LADDER": "ladder",
    "FULL_LADDER": "ladder",
    "write_report": "report",
}


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'curvops.validation' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
