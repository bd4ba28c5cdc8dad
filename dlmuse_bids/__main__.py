"""``python -m dlmuse_bids`` runs the ``dlmuse`` command."""

import sys

from .cli import dlmuse_main

if __name__ == "__main__":
    sys.exit(dlmuse_main())
