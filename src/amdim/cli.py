"""amdim: self-supervised image representations with AMDIM (NeurIPS 2019).

Each command lives in its own module, which provides `register(subparsers)`: it adds its
subparser and sets `func` (called with the parsed arguments).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# command modules, in the order `amdim --help` lists them
COMMANDS = ("amdim.training.pretrain_command", "amdim.evaluation.evaluate",
            "amdim.evaluation.extract", "amdim.training.export", "amdim.evaluation.plots",
            "amdim.evaluation.segment", "amdim.training.benchmark")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="amdim", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        importlib.import_module(module).register(subparsers)
    args = parser.parse_args(argv if argv is not None else sys.argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args.func(args)
    except KeyboardInterrupt:
        sys.exit(130)
