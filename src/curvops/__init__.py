"""curvops: curvature matrices of PyTorch models as linear operators.

Layers, bottom to top; a layer imports only the layers below it, never one above (not even
inside a function), as the import-linter contracts in ``pyproject.toml`` check:

    curvops.linops: inputs (parameters, losses, objectives, data, HuggingFace models), the
        torch-native operators (Hessian, GGN, Fisher, empirical Fisher, Gram) with their
        algebra, their scipy and cupy views, and micro-batch memory planning.
    curvops.solvers: Lanczos and the estimators, solves and metrics that work on any operator.
    curvops.adapters: the front doors from a model and its data to a result: the seed API
        and FisherSpectral.
    curvops.validation: the model zoo, cross-checks, the validation ladder, benchmarks, reports.
    curvops.cli: the ``curvops`` command line (also ``python -m curvops``).
"""

__version__ = "0.1.0"
