"""`amdim export`: the encoder of a checkpoint alone (weights, config, digest), for sharing.

A pretraining checkpoint also holds the optimiser state, the probes and the random streams
(2.5 GB for imagenet-large); the exported file holds only what `load_encoder` needs, and
the mixture head of a run of --n-mixtures K, which `amdim segment` draws. It is never
written over the checkpoint or a run folder's files.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..runtime import check_output
from . import checkpoint

log = logging.getLogger("amdim")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="write a checkpoint's encoder alone (weights, config, digest)",
        description="Write the encoder of a checkpoint (ours or the authors') without the "
        "optimiser state, probes or random streams (a mixture head is kept): the file to "
        "share. amdim.load_encoder, amdim evaluate, extract and segment read it.")
    parser.add_argument("checkpoint", help="checkpoint file (ours or the authors')")
    parser.add_argument("--out", help="output file (default: CHECKPOINT.encoder.pt)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    out = args.out or str(Path(args.checkpoint).with_suffix(".encoder.pt"))
    try:
        check_output(out, [args.checkpoint])
        path = checkpoint.export_encoder(args.checkpoint, out)
    except (ValueError, checkpoint.CheckpointError) as error:
        raise SystemExit(f"amdim export: {error}") from None
    except OSError as error:
        raise SystemExit(f"amdim export: cannot write {out} ({error.strerror or error})") from None
    log.info("encoder of %s -> %s (%.1f MB)", args.checkpoint, path, path.stat().st_size / 1e6)
