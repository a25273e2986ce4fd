"""`amdim pretrain`: its flags (one per PretrainConfig field), the preset chosen for the data
when none is named, and the command that runs pretraining and prints its metrics."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

import torch

from ..config import PRESETS, PretrainConfig, add_config_flags, preset
from ..data.datasets import DataError, stored_image_size
from ..runtime import resolve_device
from . import checkpoint
from .pretraining import pretrain
from .run_folder import CHECKPOINT, EXIT_CODES, TrainingError

log = logging.getLogger("amdim")


def choose_preset(data: str, device: str = "auto", data_root: str = "data") -> tuple[str, str]:
    """(preset, why) for --data without --preset: by the data's stored image size and whether
    training runs on a GPU. CPU: cifar-cpu up to 48 px, else imagenette-cpu (64 px); GPU:
    cifar-small up to 48 px, stl10 (64 px) up to 96 px, else imagenet-small (128 px)."""
    if data == "digits":
        return "digits", None
    size = stored_image_size(data, data_root)
    gpu = resolve_device(device).type == "cuda"
    if size is None:  # not readable yet: the run will say why
        size = 32
    if gpu:
        name = "cifar-small" if size <= 48 else "stl10" if size <= 96 else "imagenet-small"
    else:
        name = "cifar-cpu" if size <= 48 else "imagenette-cpu"
    return name, f"{size} px images, training on {'a GPU' if gpu else 'the CPU'}"


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    """The preset (--preset; without it, chosen for --data by choose_preset) with every flag
    given applied. The choice is in `args.preset_chosen` afterwards: (name, why or None)."""
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainConfig)
                 if getattr(args, f.name) is not None}
    name, why = getattr(args, "preset", None), None
    if name is None:
        name, why = choose_preset(overrides.get("data", "digits"),
                                  overrides.get("device", "auto"),
                                  overrides.get("data_root", "data"))
    args.preset_chosen = (name, why)
    return preset(name, **overrides)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "pretrain", help="self-supervised pretraining of an AMDIM encoder",
        description="Pretrain an AMDIM encoder. With no flags: a small model on the handwritten "
        "digits shipped in scikit-learn (offline, a few minutes on a CPU), ending with a "
        "linear-probe comparison against random initialisation. Real data: e.g. "
        "--preset cifar-small --data /path/to/cifar10 (a folder with train/<class>/ and "
        "test/<class>/) --run-dir runs/cifar. Rerunning a command resumes its run folder. "
        "Each flag's default is given preset by preset. Exit status: 0 finished, 130 "
        "stopped by Ctrl-C, 143 by SIGTERM, 75 by --time-limit (rerun to resume), 1 an error.")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="named defaults (default: digits; with --data, the one that fits "
                        "its image size and the device: cifar-cpu or imagenette-cpu on a CPU, "
                        "cifar-small, stl10 or imagenet-small on a GPU): " + "; ".join(
                            f"{k}: {v.get('image_size')} px ndf {v.get('ndf')} n_rkhs "
                            f"{v.get('n_rkhs')} n_depth {v.get('n_depth')}" for k, v in PRESETS.items()))
    add_config_flags(parser)
    parser.set_defaults(func=_run)


# the settings the start-up line shows (all of them are in the run folder's config.json)
SHOWN = ("data", "image_size", "ndf", "n_rkhs", "n_depth", "batch_size", "epochs", "lr",
         "warmup_steps", "lr_milestones", "final_probe")


def _message(error: BaseException) -> str:
    """The error's message, without the traceback that DataLoader adds to one raised in a
    worker process."""
    text = str(error) if not isinstance(error, OSError) or not error.strerror else (
        f"{error.filename + ': ' if error.filename else ''}{error.strerror}")
    if "Traceback (most recent call last)" in text:
        last = text.strip().splitlines()[-1]
        return last.partition(": ")[2] or last
    return text


def _run(args: argparse.Namespace) -> None:
    try:
        cfg = config_from_args(args)
        name, why = args.preset_chosen
        if int(os.environ.get("RANK", "0")) == 0:
            log.info("preset %s%s; in effect: %s", name,
                     f" (chosen for {why}; --preset picks another)" if why else "",
                     ", ".join(f"{k} {getattr(cfg, k)}" for k in SHOWN))
        metrics = pretrain(cfg)
    except (ValueError, TrainingError, DataError, checkpoint.CheckpointError, OSError) as error:
        raise SystemExit(f"amdim pretrain: {_message(error)}") from None
    except KeyboardInterrupt:  # a second Ctrl-C: at once, the write of a checkpoint too
        path = os.path.join(args.run_dir or PretrainConfig.run_dir, CHECKPOINT)
        kept = (f"{path} holds the run as of its last save" if os.path.exists(path)
                else "no checkpoint was saved")
        print(f"amdim pretrain: interrupted at once (a second Ctrl-C); {kept}; run the same "
              "command to resume", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    print(json.dumps(metrics, indent=2))
    if "stopped" in metrics:  # saved, to be resumed: tell schedulers and scripts apart
        raise SystemExit(EXIT_CODES.get(metrics["stopped"], EXIT_CODES["time limit"]))
