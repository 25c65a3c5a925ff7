"""``python -m curvops.validation.gpu_run``: run it; exit 0 when every section ran, else 2.

The watchdog exits with 3 (``EXIT_TIMEOUT``) at the deadline. The budget counts from
:data:`~curvops.validation.gpu_run.T_PROCESS`, taken before the heavy imports.
"""

from __future__ import annotations

import sys

from . import T_PROCESS, main

if __name__ == "__main__":
    sys.exit(0 if main(t_start=T_PROCESS)["status"] == "complete" else 2)
