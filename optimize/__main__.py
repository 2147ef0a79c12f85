"""``python -m optimize``: see :mod:`optimize.cli`."""

from __future__ import annotations

import sys

from optimize.cli import main

if __name__ == "__main__":
    sys.exit(main())
