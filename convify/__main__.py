"""``python -m convify``: the same command line as the ``convify`` script."""
from __future__ import annotations

import sys

from convify.cli import main

if __name__ == "__main__":
    sys.exit(main())
