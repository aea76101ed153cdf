"""``bids_adhd simulate``: the command line of both simulator profiles.

``--profile demo`` (default) runs :mod:`bids_adhd.simulate`, ``--profile realistic``
:mod:`bids_adhd.simulate_realistic`, which builds on the first. Keeping the dispatch here,
above both, means neither profile module imports the other's caller (no import cycle).
"""
from __future__ import annotations

import argparse

from . import simulate, simulate_realistic
from .settings import SimulateSettings, from_namespace


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    simulate.add_cli_arguments(parser)
    simulate_realistic.add_cli_arguments(parser)


def run_cli(args: argparse.Namespace) -> int:
    settings = from_namespace(SimulateSettings, args)
    run = simulate_realistic.run if settings.profile == "realistic" else simulate.run
    print(run(settings))
    return 0
