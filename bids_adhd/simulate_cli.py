"""``bids_adhd simulate``: the command line of both simulator profiles.

``--profile demo`` (default) runs :mod:`bids_adhd.simulate`, ``--profile realistic``
:mod:`bids_adhd.simulate_realistic`, which builds on the first. Keeping the dispatch here,
above both, means neither profile module imports the other's caller (no import cycle).
"""
from __future__ import annotations

import argparse

from . import simulate, simulate_realistic


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    simulate.add_cli_arguments(parser)
    simulate_realistic.add_cli_arguments(parser)


def run_cli(args) -> int:
    if getattr(args, "profile", "demo") == "realistic":
        return simulate_realistic.run_cli(args)
    return simulate.run_cli(args)
