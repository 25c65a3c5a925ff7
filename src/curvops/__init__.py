"""curvops: curvature matrices of PyTorch models as linear operators.

Subpackages:
    curvops.linops: the torch-native operators (Hessian, GGN, Fisher, empirical Fisher).
    curvops.solvers: Lanczos and the estimators that work on any operator.
    curvops.adapters: models and data in (torch, HuggingFace), array views out (scipy, cupy), CLI.
    curvops.validation: the model zoo, cross-checks and benchmarks.
"""

__version__ = "0.1.0"
