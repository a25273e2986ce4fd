"""Command line: `amdim pretrain | ...`."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="amdim", description=__doc__)
    parser.add_subparsers(dest="command", required=True)
    parser.parse_args(argv if argv is not None else sys.argv[1:])
