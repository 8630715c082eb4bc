"""CLI for the caption stage (placeholder until the stage lands)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add this stage's subcommands (none yet)."""
