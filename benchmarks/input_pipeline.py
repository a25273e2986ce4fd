"""The input pipeline on this CPU: how fast each data path delivers finished view pairs, and
what it leaves of the training step. Results: benchmarks/results/cpu-input-pipeline.json (each
part rewrites its own section, with the commands it ran).

    python benchmarks/input_pipeline.py rates        # per core, ImageNet-sized JPEGs, 128 px
    python benchmarks/input_pipeline.py imagenette   # end to end on every core, 64 px
    python benchmarks/input_pipeline.py short-side   # the store's short side: linear probes
    python benchmarks/input_pipeline.py enlarged     # views enlarged at each short side

rates: an ImageNet-sized corpus (benchmarks/jpeg_corpus.py, 2,000 images) as a folder and as
an `amdim prepare` store; `amdim benchmark --data-path loader|decode` pinned to one core
(`taskset -c CORE`: no loader workers, the views built in the process), the paper's 128 px views.
imagenette: Imagenette-128 as an image folder (../shared/data/to_imagefolder.py), the
imagenette-cpu preset (64 px) on both cores: the step alone, then end to end on the path auto
chooses and on the loader path.
short-side: the same imagenette-cpu pretraining (EPOCHS epochs, one core each, two at a time)
from the Imagenette folder and from stores of it at smaller short sides, each followed by the
final linear probe on frozen features, to choose prepare's default short side.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results" / "cpu-input-pipeline.json"
WORK = Path(os.environ.get("AMDIM_BENCH_WORK", "/tmp/amdim-input-pipeline"))
AMDIM = [sys.executable, "-m", "amdim"]
EPOCHS = 6
SHORT_SIDES = (96, 64)  # below Imagenette's 128 px: what a smaller store loses


def run(argv: list[str], cores: str | None = None) -> tuple[str, float]:
    """Run a command (pinned to `cores`), its stdout and seconds; stderr passes through."""
    argv = (["taskset", "-c", cores] if cores else []) + [str(a) for a in argv]
    print("$", " ".join(argv), flush=True)
    start = time.perf_counter()
    out = subprocess.run(argv, check=True, stdout=subprocess.PIPE, text=True).stdout
    return out, time.perf_counter() - start


def command_line(argv: list[str], cores: str | None = None) -> str:
    text = " ".join(str(a) for a in argv).replace(sys.executable + " -m amdim", "amdim")
    return (f"taskset -c {cores} " if cores else "") + text.replace(str(WORK), "$WORK")


def save(section: str, value) -> None:
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[section] = value
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS} [{section}]")


def benchmark(data: Path, path: str, cores: str | None, *extra: str, steps: int = 10) -> dict:
    argv = [*AMDIM, "benchmark", "--preset", "imagenette-cpu", "--data", data, "--data-path",
            path, "--steps", steps, "--warmup", "3", *extra]
    out, _ = run(argv, cores)
    results = json.loads(out)
    keep = ("data_path", "loader_workers", "end_to_end_threads", "image_size", "batch_size",
            "train_images_per_s", "augment_images_per_s", "per_worker_images_per_s",
            "end_to_end_images_per_s", "decode_s")
    return {"command": command_line(argv, cores), **{k: results[k] for k in keep}}


def corpus_and_store() -> tuple[Path, Path, dict]:
    """The corpus and its store (made if missing), with what they hold."""
    corpus, store = WORK / "corpus", WORK / "corpus-store"
    if not corpus.exists():
        run([sys.executable, ROOT / "benchmarks" / "jpeg_corpus.py", corpus, "--images", "2000"])
    summary = {"corpus_command": "python benchmarks/jpeg_corpus.py $WORK/corpus --images 2000"}
    if not store.exists():
        _, summary["prepare_s"] = run([*AMDIM, "prepare", corpus, store])
    from PIL import Image

    files = sorted((corpus / "train").rglob("*.JPEG"))
    sizes = np.array([Image.open(f).size for f in files])
    stored = json.loads((store / "train" / "store.json").read_text())
    return corpus, store, {**summary, "images": len(files),
                           "mean_width": float(sizes[:, 0].mean()),
                           "mean_height": float(sizes[:, 1].mean()),
                           "mean_kb": sum(f.stat().st_size for f in files) / len(files) / 1e3,
                           "store_short_side": stored["short_side"],
                           "store_mean_kb": (store / "train" / "jpeg.u8").stat().st_size
                           / len(files) / 1e3}


def rates(core: str) -> None:
    corpus, store, summary = corpus_and_store()
    found = {"corpus": summary, "views": "paper, 128 px, batches of 64, one core"}
    for name, data, path in (("folder, loader path (before)", corpus, "loader"),
                             ("store, loader path", store, "loader"),
                             ("store, decode path", store, "decode"),
                             ("folder, decode path", corpus, "decode")):
        found[name] = benchmark(data / "train", path, core, "--image-size", "128",
                                "--batch-size", "64")
        save("rates", found)
    before = found["folder, loader path (before)"]["augment_images_per_s"]
    found["speedup_over_before"] = {name: value["augment_images_per_s"] / before
                                    for name, value in found.items()
                                    if isinstance(value, dict) and "augment_images_per_s" in value}
    save("rates", found)


def enlarged() -> None:
    """The share of 128 px views (paper crops, 10 draws an image) whose crop is smaller than
    the view on some side, when the corpus is stored at each short side."""
    from amdim.views.batch_geometry import sample_crop_boxes
    from PIL import Image

    corpus, _, _ = corpus_and_store()
    sizes = [Image.open(f).size for f in sorted((corpus / "train").rglob("*.JPEG"))]
    generator, found = torch.Generator().manual_seed(0), {}
    for side in (128, 160, 192, 224, 256, 288):
        enlarged_views = 0
        for width, height in sizes:
            scale = side / min(width, height)
            h, w = round(height * scale), round(width * scale)
            _, _, crop_h, crop_w = sample_crop_boxes(10, h, w, generator)
            enlarged_views += int(((crop_h < 128) | (crop_w < 128)).sum())
        found[str(side)] = enlarged_views / (10 * len(sizes))
    save("enlarged_views", {"command": "python benchmarks/input_pipeline.py enlarged",
                            "views": "paper, 128 px, 10 crops of each of the 2,000 corpus images",
                            "share_by_short_side": found})


def imagenette_folder() -> Path:
    folder = WORK / "imagenette"
    for split, name in (("train", "imagenette128_train.npz"), ("val", "imagenette128_val.npz")):
        if not (folder / split).exists():
            run([sys.executable, SHARED / "to_imagefolder.py", SHARED / name, folder / split])
    return folder


def imagenette() -> None:
    folder = imagenette_folder()
    found = {}
    for path in ("auto", "loader"):
        found[path] = benchmark(folder, path, None, steps=40)
        found[path]["end_to_end_fraction_of_step"] = (found[path]["end_to_end_images_per_s"]
                                                      / found[path]["train_images_per_s"])
        save("imagenette", found)


def short_side() -> None:
    folder = imagenette_folder()
    sources = {"folder (128 px)": folder}
    for side in SHORT_SIDES:
        store = WORK / f"imagenette-store-{side}"
        if not store.exists():
            run([*AMDIM, "prepare", folder, store, "--short-side", side])
        sources[f"store, short side {side}"] = store
    found, pending = {}, list(sources.items())
    while pending:  # two runs at a time, one core each
        batch, pending = pending[:2], pending[2:]
        procs = []
        for core, (name, data) in enumerate(batch):
            run_dir = WORK / "runs" / name.replace(" ", "-").replace(",", "").replace("(", "") \
                .replace(")", "")
            argv = [*AMDIM, "pretrain", "--preset", "imagenette-cpu", "--data", data,
                    "--epochs", EPOCHS, "--lr-milestones", EPOCHS - 1, "--data-path", "decode",
                    "--threads", "1", "--final-probe", "--run-dir", run_dir]
            print("$", command_line(argv, str(core)), flush=True)
            procs.append((name, argv, run_dir, core, subprocess.Popen(
                ["taskset", "-c", str(core)] + [str(a) for a in argv],
                stdout=subprocess.PIPE, text=True)))
        for name, argv, run_dir, core, proc in procs:
            out, _ = proc.communicate()
            if proc.returncode:
                raise SystemExit(f"{name}: exit {proc.returncode}")
            final = json.loads(out[out.index("{"):])
            found[name] = {"command": command_line(argv, str(core)),
                           **{k: final.get(k) for k in ("final_linear_probe_acc",
                                                        "random_init_linear_probe_acc",
                                                        "test_linear_acc", "images_per_s")}}
            save("short_side", {"epochs": EPOCHS, "runs": found})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("rates", "imagenette", "short-side", "enlarged"))
    parser.add_argument("--core", default="0", help="the core rates are measured on")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    if args.part == "rates":
        rates(args.core)
    else:
        {"imagenette": imagenette, "short-side": short_side, "enlarged": enlarged}[args.part]()


if __name__ == "__main__":
    main()
