#!/usr/bin/env python3
"""Thin shim: ``python cli.py ARGS`` behaves exactly like ``captioner ARGS``."""

import sys

from captioner.cli import main

if __name__ == "__main__":
    sys.exit(main())
