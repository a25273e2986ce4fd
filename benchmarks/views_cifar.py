"""Views from the data on a CPU: CIFAR-10 pretrained with --views lab (L and ab channels of
CIE Lab, one encoder each) and with --views augment (the paper's two augmented copies, one
encoder) for the same steps, each probed against its architecture at random init.

    taskset -c 0 env OMP_NUM_THREADS=1 python benchmarks/views_cifar.py \\
        --data /work/shared/data/cifar10_jpeg_train.npz \\
        --out benchmarks/results/cpu-views-cifar10.json

Every run is the cifar-cpu preset (ndf 32, n_rkhs 256, n_depth 1, batch 128, lr 1e-3,
bf16 where native, channels-last) for --epochs epochs of --steps-per-epoch steps, warmup a
fifth of the steps; only --views differs. The probe: logistic regression on standardised
frozen global features of --probe-train training images (a fixed random sample) and the
whole test set (10,000), the trained encoder(s) and the same architecture at random init;
for lab per view (L, ab) and on both features concatenated (all).
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from amdim.config import preset
from amdim.model import multiview
from amdim.model.frozen_features import compare_with_random_init
from amdim.training import checkpoint
from amdim.training.inputs import build_datasets, build_view_datasets
from amdim.training.pretraining import pretrain

VIEWS = ("lab", "augment")


def command(args, views: str, run_dir: str) -> str:
    return (f"amdim pretrain --preset cifar-cpu --data {args.data} --views {views} --epochs "
            f"{args.epochs} --steps-per-epoch {args.steps_per_epoch} --warmup-steps "
            f"{args.epochs * args.steps_per_epoch // 5} --device cpu --final-probe "
            f"--final-probe-images {args.probe_train} --run-dir {run_dir}")


def probe(cfg, path: Path, n_train: int) -> dict[str, float]:
    """The final probe of `amdim pretrain --final-probe` on the run's checkpoint."""
    device = torch.device("cpu")
    if cfg.views == "augment":
        train_set, test_set, _ = build_datasets(cfg)
        return compare_with_random_init(checkpoint.load_encoder(path), cfg.seed, train_set,
                                        test_set, device, n_train)
    train_set, test_set, _ = build_view_datasets(cfg)
    model = checkpoint.load_encoder(path, view="all").model
    return multiview.compare_with_random_init(model, cfg, train_set, test_set, device, n_train)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/work/shared/data/cifar10_jpeg_train.npz")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps-per-epoch", type=int, default=200)
    parser.add_argument("--probe-train", type=int, default=10_000, help="training images probed")
    parser.add_argument("--root", default="runs/views-cifar", help="one run folder per --views")
    parser.add_argument("--views", nargs="*", default=VIEWS, choices=VIEWS,
                        help="the runs to make (others already in --out are kept)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    kept = json.loads(out.read_text())["runs"] if out.exists() else []
    runs = [run for run in kept if run["views"] not in args.views]
    for views in args.views:
        run_dir = Path(args.root) / views
        steps = args.epochs * args.steps_per_epoch
        cfg = preset("cifar-cpu", data=args.data, views=views, epochs=args.epochs,
                     steps_per_epoch=args.steps_per_epoch, warmup_steps=steps // 5,
                     final_probe=False, device="cpu", run_dir=str(run_dir))
        commit, start = _commit(), time.perf_counter()  # the code that trains
        metrics = pretrain(cfg)
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        accuracy = probe(cfg, run_dir / "checkpoint.pt", args.probe_train)
        probe_s = time.perf_counter() - start
        saved = json.loads((run_dir / "config.json").read_text())
        runs.append({"views": views, "git_commit": commit, "command": command(args, views, str(run_dir)),
                     "steps": metrics["step"], "images_seen": metrics["step"] * cfg.batch_size,
                     "pretrain_wall_s": round(train_s, 1), "probe_wall_s": round(probe_s, 1),
                     "images_per_s": metrics["images_per_s"], "final_loss": metrics["loss"],
                     "online_test_linear_acc": metrics.get("test_linear_acc"),
                     **accuracy, "config": saved})
        print(json.dumps(runs[-1]), flush=True)
    runs.sort(key=lambda run: VIEWS.index(run["views"]))
    report = {"benchmark": "views_cifar", "data": args.data, "runs": runs,
              "probe": f"logistic regression on {args.probe_train} training images (fixed "
                       "sample), the whole test set",
              "machine": {"cpu": platform.processor() or platform.machine(),
                          "torch": torch.__version__, "python": sys.version.split()[0],
                          "threads": torch.get_num_threads()}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


def _commit() -> str:
    """HEAD, with "+changes" when the working tree differs from it."""
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True).stdout.strip()
    return git("rev-parse", "HEAD") + ("+changes" if git("status", "--porcelain", "src") else "")


if __name__ == "__main__":
    main()
