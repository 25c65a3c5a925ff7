"""``python -m curvops``: the command line (see :mod:`curvops.cli`)."""

import sys

from .cli import main

sys.exit(main())
