"""AMDIM's objective on a standard backbone next to the paper's encoder, on a CPU: each
pretrained for the same steps on CIFAR-10, then a linear probe on frozen global features
against the same architecture at random init; and FLOP per image and parameter count of the
backbones next to the paper's encoders (`amdim benchmark`).

    python benchmarks/backbones_cifar.py --data /work/shared/data/cifar10_jpeg_train.npz \\
        --out benchmarks/results/cpu-backbones-cifar10.json

Every run is the cifar-cpu preset (batch 128, lr 1e-3, bf16 where native, channels-last)
for --steps steps, with warmup shortened to a fifth of them; only the backbone differs (the
paper's encoder: ndf 32, n_rkhs 256, n_depth 1; resnet18: CIFAR stem, n_rkhs 256). Pin it
to one core for CPU-comparable wall times: taskset -c 0 env OMP_NUM_THREADS=1 python ...
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import Subset

from amdim.config import preset
from amdim.model.backbones import build_encoder
from amdim.model.frozen_features import linear_probe_accuracy
from amdim.training import benchmark, checkpoint
from amdim.training.inputs import build_datasets
from amdim.training.pretraining import pretrain

BACKBONES = ("amdim", "resnet18")  # trained and probed
# (name, `amdim benchmark` flags): FLOP per image and parameters only, a few steps each
SIZES = (("paper encoder, cifar-cpu (32 px)", ["--preset", "cifar-cpu", "--batch-size", "16"]),
         ("resnet18 (32 px)", ["--preset", "cifar-cpu", "--backbone", "resnet18",
                               "--batch-size", "16"]),
         ("paper encoder, cifar-small (32 px)", ["--preset", "cifar-small", "--batch-size", "8"]),
         ("paper encoder, imagenet-small (128 px)", ["--preset", "imagenet-small",
                                                     "--batch-size", "2"]),
         ("resnet50 (128 px)", ["--backbone", "resnet50", "--image-size", "128",
                                "--batch-size", "8"]))


def probe(cfg, encoder: torch.nn.Module, n_train: int, n_test: int) -> tuple[float, float]:
    """Linear-probe accuracy of the trained encoder and of its architecture at random init
    (seeded by cfg.seed), on fixed random subsets of the training and test images."""
    train_set, test_set, _ = build_datasets(cfg)
    train_set = copy.copy(train_set)  # the training images with the deterministic transform
    train_set.transform = test_set.transform
    pick = torch.Generator().manual_seed(0)
    train_set = Subset(train_set, torch.randperm(len(train_set), generator=pick)[:n_train].tolist())
    test_set = Subset(test_set, torch.randperm(len(test_set), generator=pick)[:n_test].tolist())
    torch.manual_seed(cfg.seed)
    random_init = build_encoder(cfg.encoder).eval()
    device = torch.device("cpu")
    return (linear_probe_accuracy(encoder, train_set, test_set, device),
            linear_probe_accuracy(random_init, train_set, test_set, device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/work/shared/data/cifar10_jpeg_train.npz")
    parser.add_argument("--steps", type=int, default=150, help="pretraining steps per run")
    parser.add_argument("--probe-train", type=int, default=5000, help="training images probed")
    parser.add_argument("--probe-test", type=int, default=2000, help="test images probed")
    parser.add_argument("--root", default="runs/backbones-cifar", help="one run folder per backbone")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    runs = []
    for backbone in BACKBONES:
        cfg = preset("cifar-cpu", data=args.data, backbone=backbone, epochs=1,
                     steps_per_epoch=args.steps, warmup_steps=args.steps // 5,
                     final_probe=False, device="cpu", run_dir=str(Path(args.root) / backbone))
        start = time.perf_counter()
        metrics = pretrain(cfg)
        train_s = time.perf_counter() - start
        encoder = checkpoint.load_encoder(Path(cfg.run_dir) / "checkpoint.pt")
        start = time.perf_counter()
        trained, random_init = probe(cfg, encoder, args.probe_train, args.probe_test)
        row = {"backbone": backbone, "pretrain_seconds": train_s,
               "probe_seconds": time.perf_counter() - start,
               "images_per_s": metrics.get("images_per_s"), "steps": metrics["step"],
               "loss": metrics.get("loss"), "test_linear_acc_online": metrics.get("test_linear_acc"),
               "linear_probe_acc": trained, "random_init_linear_probe_acc": random_init,
               "encoder_parameters": sum(p.numel() for p in encoder.parameters()
                                         if p.requires_grad),
               "config": json.loads(json.dumps(cfg.to_dict()))}
        runs.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "config"}), flush=True)
    sizes = []
    for name, flags in SIZES:
        command = ["benchmark", *flags, "--steps", "1", "--warmup", "0", "--device", "cpu"]
        bench = argparse.ArgumentParser()
        benchmark.register(bench.add_subparsers())
        result = benchmark.run(bench.parse_args(command))
        sizes.append({"name": name, "command": "amdim " + " ".join(command),
                      **{k: result[k] for k in ("backbone", "image_size", "encoder_parameters",
                                                "flop_per_image", "precision")},
                      **{k: result["config"][k] for k in ("ndf", "n_rkhs", "n_depth")}})
    report = {"command": "python benchmarks/backbones_cifar.py " + " ".join(sys.argv[1:]),
              "device": f"cpu ({platform.processor() or platform.machine()}, "
                        f"{torch.get_num_threads()} threads)",
              "probe": {"train_images": args.probe_train, "test_images": args.probe_test,
                        "classifier": "scikit-learn LogisticRegression on standardised r1"},
              "runs": runs, "sizes": sizes}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
