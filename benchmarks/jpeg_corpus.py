"""A realistic ImageNet-like folder of JPEGs for the input-pipeline benchmarks and tests, made
from the real photographs that ship inside the project's dependencies (scikit-learn's
china.jpg and flower.jpg, matplotlib's grace_hopper.jpg). Never committed: make it when needed.

    python benchmarks/jpeg_corpus.py /tmp/corpus --images 2000 --classes 10

writes /tmp/corpus/train/<class>/<n>.JPEG (and val/ with --val N). Each image is a random crop
(a tenth to all of the photograph's area, aspect 3:4 to 16:9) of one of the three photographs,
flipped at random, resized to ImageNet's sizes (the longer side 500 px in 80% of images, else
300-500 px; landscape 3 in 4) and saved at JPEG quality 90 with 4:2:0 chroma, as ImageNet's
files are: about 500x375 px and 60-70 KB on average. Deterministic for a seed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def photographs() -> list[Image.Image]:
    """The three photographs, RGB, from the installed scikit-learn and matplotlib."""
    import matplotlib
    import sklearn

    paths = [Path(sklearn.__file__).parent / "datasets" / "images" / name
             for name in ("china.jpg", "flower.jpg")]
    paths.append(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    return [Image.open(p).convert("RGB") for p in paths]


def corpus_image(sources: list[Image.Image], rng: np.random.Generator) -> Image.Image:
    """One ImageNet-sized image: a random crop of a random photograph, flipped, resized."""
    source = sources[rng.integers(len(sources))]
    width, height = source.size
    long = 500 if rng.random() < 0.8 else int(rng.integers(300, 501))
    aspect = rng.uniform(0.75, 16 / 9)  # long / short side
    out = (long, int(round(long / aspect)))
    if rng.random() < 0.25:  # portrait
        out = out[::-1]
    # a crop of the source with the output's aspect, covering 10-100% of its area
    area = rng.uniform(0.1, 1.0) * width * height
    crop_w = min(width, int(round(np.sqrt(area * out[0] / out[1]))))
    crop_h = min(height, int(round(crop_w * out[1] / out[0])))
    left, top = int(rng.integers(0, width - crop_w + 1)), int(rng.integers(0, height - crop_h + 1))
    image = source.crop((left, top, left + crop_w, top + crop_h)).resize(out, Image.BICUBIC)
    return image.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image


def write_corpus(out: str | Path, images: int, classes: int = 10, val: int = 0, seed: int = 0,
                 quality: int = 90) -> dict:
    """Write `images` training images (and `val` validation images) in `classes` class
    folders under out/train (out/val); returns a summary."""
    out, rng, sources = Path(out), np.random.default_rng(seed), photographs()
    sizes, nbytes = [], 0
    for split, count in (("train", images), ("val", val)):
        for i in range(count):
            folder = out / split / f"class{i % classes:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{split}_{i:07d}.JPEG"
            image = corpus_image(sources, rng)
            image.save(path, quality=quality, subsampling="4:2:0")
            sizes.append(image.size)
            nbytes += path.stat().st_size
    sizes = np.array(sizes)
    return {"folder": str(out), "images": images, "val": val, "classes": classes,
            "seed": seed, "quality": quality, "mean_width": float(sizes[:, 0].mean()),
            "mean_height": float(sizes[:, 1].mean()), "mean_kb": nbytes / len(sizes) / 1e3}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the folder to write (train/ and val/ inside)")
    parser.add_argument("--images", type=int, default=2000, help="training images")
    parser.add_argument("--val", type=int, default=0, help="validation images")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quality", type=int, default=90)
    args = parser.parse_args(argv)
    if Path(args.out).exists() and any(Path(args.out).iterdir()):
        sys.exit(f"{args.out} is not empty; pass a new folder")
    print(json.dumps(write_corpus(args.out, args.images, args.classes, args.val, args.seed,
                                  args.quality)))


if __name__ == "__main__":
    main()
