"""amdim: self-supervised image representations with AMDIM (NeurIPS 2019).

Each command lives in its own module, which provides `register(subparsers)`: it adds its
subparser and sets `func` (called with the parsed arguments).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys

# command modules, in the order `amdim --help` lists them
COMMANDS = ("amdim.data.prepare",
            "amdim.training.pretrain_command", "amdim.evaluation.evaluate",
            "amdim.evaluation.extract", "amdim.training.export", "amdim.evaluation.plots",
            "amdim.evaluation.segment", "amdim.training.benchmark")


def main(argv: list[str] | None = None) -> None:
    # Ctrl-C (130) and SIGTERM (143) end any command at once, in start-up imports too, with
    # their exit status and no traceback; `amdim pretrain` handles both itself (it saves first)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        parser = argparse.ArgumentParser(prog="amdim", description=__doc__.splitlines()[0])
        subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
        for module in COMMANDS:
            importlib.import_module(module).register(subparsers)
        args = parser.parse_args(argv if argv is not None else sys.argv[1:])
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        args.func(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except _Terminated:
        sys.exit(143)
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Terminated(BaseException):
    """SIGTERM outside pretraining's own handling."""


def _terminate(number, frame):
    raise _Terminated
