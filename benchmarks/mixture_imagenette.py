"""Segmentation from mixture representations on real photographs (paper section 3.7).

Pretrains the imagenette-cpu model (64 px) on Imagenette for 12 epochs under each setting of
RUNS, then reports the linear probe, the spatial coherence of the mixture posterior against
chance, K = 1 and random init, and draws the posterior over 16 fixed validation images.

    # one queue per core (each run uses one core; a queue runs its settings in turn)
    taskset -c 0 python benchmarks/mixture_imagenette.py train k4-a0.1 k4-a1 k4-a0.3-init1
    taskset -c 1 python benchmarks/mixture_imagenette.py train k4-a0.3 k1 k8-a0.3
    python benchmarks/mixture_imagenette.py report \\
        --out benchmarks/results/cpu-imagenette-mixtures.json --docs docs
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from amdim import mixture
from amdim.config import add_config_flags, config_from_args
from amdim.train import pretrain

DATA = "../shared/data/imagenette128_train.npz"
# 12 of imagenette-cpu's 40 epochs, its milestones (32, 37) scaled to 12
COMMON = ["--preset", "imagenette-cpu", "--epochs", "12", "--lr-milestones", "10", "11",
          "--final-probe"]
RUNS = {  # name: (K, alpha, output-layer init scale of the mixture head)
    "k1": (1, 1.0, mixture.OUTPUT_INIT_SCALE),
    "k4-a0.1": (4, 0.1, mixture.OUTPUT_INIT_SCALE),
    "k4-a0.3": (4, 0.3, mixture.OUTPUT_INIT_SCALE),
    "k4-a1": (4, 1.0, mixture.OUTPUT_INIT_SCALE),
    "k8-a0.3": (8, 0.3, mixture.OUTPUT_INIT_SCALE),
    # ablation: the head's output layer at PyTorch's default init instead of 0.1x of it
    "k4-a0.3-init1": (4, 0.3, 1.0),
}
# the 16 validation images drawn for every run: fixed by this seed before any run finished
PICTURE_SEED, N_PICTURES = 18, 16


def picture_indices(n_val: int) -> list[int]:
    """The validation images to draw, in index order (the set is classes-sorted)."""
    return sorted(np.random.default_rng(PICTURE_SEED).choice(n_val, N_PICTURES, replace=False).tolist())


def pretrain_flags(name: str, data: str, root: str) -> list[str]:
    n_mixtures, alpha, _ = RUNS[name]
    return COMMON + ["--data", data, "--run-dir", str(Path(root) / name),
                     "--n-mixtures", str(n_mixtures), "--mixture-entropy", str(alpha)]


def train(args: argparse.Namespace) -> None:
    for name in args.names:
        flags = pretrain_flags(name, args.data, args.root)
        parser = argparse.ArgumentParser()
        parser.add_argument("--preset")
        add_config_flags(parser)
        cfg = config_from_args(parser.parse_args(flags))
        mixture.OUTPUT_INIT_SCALE = RUNS[name][2]  # read when the head is built
        start = time.perf_counter()
        metrics = pretrain(cfg)
        result = {"name": name, "head_init_scale": RUNS[name][2],
                  "command": "amdim pretrain " + " ".join(flags),
                  "wall_s": round(time.perf_counter() - start, 1), "final": metrics}
        (Path(cfg.run_dir) / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: v for k, v in metrics.items() if "acc" in k}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(required=True)
    run = commands.add_parser("train", help="pretrain the named settings in turn")
    run.add_argument("names", nargs="+", choices=sorted(RUNS))
    run.add_argument("--data", default=DATA)
    run.add_argument("--root", default="runs/mixtures-imagenette")
    run.set_defaults(func=train)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
