"""A paired-folder example from real data: two "cameras" of each Imagenette image, a wide one
(the whole 128 px image at 64 px) and a zoomed one (its central 64 px at full resolution),
written as <root>/{train,test}/{wide,zoom}/<class>/<n>.png, then pretrained briefly on a CPU
with --views paired (one encoder shared by the two cameras) and probed against random init.

    taskset -c 0 env OMP_NUM_THREADS=1 python benchmarks/paired_imagenette.py \\
        --out benchmarks/results/cpu-paired-imagenette.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from amdim.config import preset
from amdim.data.device_images import load_npz
from amdim.training.pretraining import pretrain

SHARED = Path("/work/shared/data")


def write_cameras(npz: Path, root: Path, count: int, seed: int = 0) -> int:
    """`count` images of npz (a fixed random sample) as two views each under root."""
    cache = load_npz(npz)
    pick = np.random.default_rng(seed).permutation(len(cache.labels))[:count]
    classes = list(cache.classes) or [str(c) for c in range(int(cache.labels.max()) + 1)]
    for n, i in enumerate(pick.tolist()):
        image = Image.fromarray(cache.images[i].permute(1, 2, 0).numpy())  # (H, W, 3)
        side = min(image.size)
        wide = image.resize((64, 64), Image.BILINEAR, reducing_gap=None)
        left, top = (image.width - side // 2) // 2, (image.height - side // 2) // 2
        zoom = image.crop((left, top, left + side // 2, top + side // 2))
        for view, picture in (("wide", wide), ("zoom", zoom)):
            folder = root / view / classes[int(cache.labels[i])]
            folder.mkdir(parents=True, exist_ok=True)
            picture.save(folder / f"{n}.png")
    return len(pick)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default="runs/paired-imagenette/data")
    parser.add_argument("--train", type=int, default=3000, help="training images (contexts)")
    parser.add_argument("--test", type=int, default=1000, help="test images (contexts)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--run-dir", default="runs/paired-imagenette/run")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    folder = Path(args.folder)
    start = time.perf_counter()
    if not (folder / "test").is_dir():
        write_cameras(SHARED / "imagenette128_train.npz", folder / "train", args.train)
        write_cameras(SHARED / "imagenette128_val.npz", folder / "test", args.test)
    build_s = time.perf_counter() - start
    steps = args.epochs * (args.train // 64)
    cfg = preset("imagenette-cpu", data=str(folder), views="paired", epochs=args.epochs,
                 warmup_steps=steps // 5, final_probe=True,
                 final_probe_images=0, device="cpu", run_dir=args.run_dir)
    start = time.perf_counter()
    metrics = pretrain(cfg)
    wall = time.perf_counter() - start
    command = (f"amdim pretrain --preset imagenette-cpu --data {folder} --views paired "
               f"--epochs {args.epochs} --warmup-steps {steps // 5} "
               f"--final-probe --final-probe-images 0 --device cpu --run-dir {args.run_dir}")
    report = {"benchmark": "paired_imagenette", "command": command,
              "views": {"wide": "the whole 128 px image resized to 64 px",
                        "zoom": "the central 64 px of the 128 px image, full resolution"},
              "train_contexts": args.train, "test_contexts": args.test,
              "build_folder_wall_s": round(build_s, 1), "pretrain_and_probe_wall_s": round(wall, 1),
              "metrics": metrics, "torch": torch.__version__,
              "threads": torch.get_num_threads()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
