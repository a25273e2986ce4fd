"""Mixture representations (paper section 3.7): pretrain with K components for several
entropy weights alpha, next to K=1 (plain AMDIM) under the same budget; report the linear
probe on frozen features, the online probes and the spatial coherence of the maps.

One command per experiment; any `amdim pretrain` flag after `--` applies to every run:

    python benchmarks/mixture_sweep.py --out benchmarks/results/cpu-digits-mixture-sweep.json
    python benchmarks/mixture_sweep.py --alphas 0.3 1 3 --out RESULT.json -- \\
        --preset cifar-small --data cifar10_jpeg_train.npz --precision bf16 --epochs 30
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from amdim.config import PRESETS, add_config_flags
from amdim.evaluation.segment import (_test_images, load_mixture_model, segment_images,
                                      spatial_coherence)
from amdim.model.mixture import assignments
from amdim.training.pretrain_command import config_from_args
from amdim.training.pretraining import pretrain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-mixtures", type=int, default=4)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.3, 1.0, 3.0])
    parser.add_argument("--root", default="runs/mixture-sweep", help="one run folder per setting")
    parser.add_argument("--out", required=True)
    args, rest = parser.parse_known_args()
    run_parser = argparse.ArgumentParser(prog="pretrain flags")
    run_parser.add_argument("--preset", default="digits", choices=sorted(PRESETS))
    add_config_flags(run_parser)
    run_args = run_parser.parse_args([a for a in rest if a != "--"])
    results = []
    settings = [(1, None)] + [(args.n_mixtures, alpha) for alpha in args.alphas]
    for n_mixtures, alpha in settings:
        name = "k1" if n_mixtures == 1 else f"k{n_mixtures}-alpha{alpha:g}"
        run_args.n_mixtures, run_args.mixture_entropy = n_mixtures, alpha or 1.0
        run_args.run_dir = str(Path(args.root) / name)
        if run_args.final_probe is None:  # needs scikit-learn: --no-final-probe where absent
            run_args.final_probe = True
        cfg = config_from_args(run_args)
        start = time.perf_counter()
        metrics = pretrain(cfg)
        row = {"name": name, "n_mixtures": n_mixtures, "mixture_entropy": alpha,
               "seconds": time.perf_counter() - start,
               **{k: metrics.get(k) for k in ("loss_1t5", "loss_1t7", "loss_5t5", "test_linear_acc",
                                             "test_mlp_acc", "final_linear_probe_acc",
                                             "random_init_linear_probe_acc")}}
        if n_mixtures > 1:
            encoder, head, saved = load_mixture_model(Path(cfg.run_dir) / "checkpoint.pt")
            images, mean, std = _test_images(saved, 64)
            with torch.no_grad():
                features = encoder(images)
                maps = assignments(features, features, head, saved.tclip, saved.mixture_entropy)
            row["coherence"] = {k: spatial_coherence(maps[k]) for k in ("r7", "r5")}
            try:  # the PNG needs matplotlib (not on the GPU image: draw it later with amdim segment)
                segment_images(encoder, head, images[:8], mean, std,
                               Path(cfg.run_dir) / "maps.png", saved.tclip, saved.mixture_entropy)
            except ImportError as error:
                print(f"no maps.png: {error}", file=sys.stderr)
        results.append(row)
        print(json.dumps(row), flush=True)
    report = {"command": "python benchmarks/mixture_sweep.py " + " ".join(sys.argv[1:]),
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "config": {k: v for k, v in cfg.to_dict().items()
                         if k not in ("n_mixtures", "mixture_entropy", "run_dir")},
              "runs": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
