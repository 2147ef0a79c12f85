"""``python -m loadtest.report RESULTS_DIR [RESULTS_DIR ...]``: see :mod:`loadtest.report`."""

from __future__ import annotations

import sys

from loadtest.report import main

sys.exit(main())
