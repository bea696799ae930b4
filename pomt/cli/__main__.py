"""``python -m pomt.cli <command> ...``: the ``pomt`` command without an install."""

import sys

from pomt.cli import main

if __name__ == "__main__":
    sys.exit(main())
