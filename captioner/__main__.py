"""``python -m captioner``: the ``captioner`` command (same arguments, same exit status)."""

import sys

from captioner.cli import main

if __name__ == "__main__":
    sys.exit(main())
