"""The proof: model zoo, cross-checks of every method, the validation ladder, reports, benchmarks.

Import from the modules themselves (:mod:`.zoo`, :mod:`.crosscheck`, :mod:`.ladder`,
:mod:`.report`, :mod:`.gpu_run`, the ``bench*`` scripts). This package file imports nothing,
so that ``python -m curvops.validation.gpu_run`` and the benchmarks set their thread settings
and start their clocks before torch is imported. Only the command line and the tests import
this package.
"""
