"""Segmentation from mixture representations on real photographs (paper section 3.7).

Pretrains the imagenette-cpu model (64 px) on Imagenette for 12 epochs (one setting 24) under
each setting of RUNS, then reports the linear probe, the spatial coherence of the mixture
posterior against chance, K = 1 and random init, and draws the posterior over 16 fixed
validation images.

    # one queue per core (each run uses one core; a queue runs its settings in turn)
    taskset -c 0 python benchmarks/mixture_imagenette.py train k4-a0.1 k4-a1 k4-a0.3-init1
    taskset -c 1 python benchmarks/mixture_imagenette.py train k4-a0.3 k1 k8-a0.3 k4-a0.3-24ep
    python benchmarks/mixture_imagenette.py report \\
        --out benchmarks/results/cpu-imagenette-mixtures.json --docs docs
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from amdim.config import PretrainConfig
from amdim.data.datasets import normalisation
from amdim.evaluation.classifier_training import EvaluationConfig
from amdim.evaluation.evaluate import evaluate_checkpoint
from amdim.evaluation.segment import (compare_maps, load_mixture_model, pictures, posterior_maps,
                                      spatial_coherence, within_image_structure)
from amdim.model import mixture
from amdim.model.amdim import AMDIM
from amdim.model.nce import nce_log_probs
from amdim.training.checkpoint import load_model
from amdim.training.inputs import build_datasets
from amdim.training.pretrain_command import config_from_args, register as register_pretrain
from amdim.training.pretraining import pretrain
from cpu_results import random_init_copy  # benchmarks/, beside this script

DATA = "../shared/data/imagenette128_train.npz"
COMMON = ["--preset", "imagenette-cpu", "--final-probe"]
INIT = mixture.OUTPUT_INIT_SCALE
RUNS = {  # name: (K, alpha, output-layer init scale of the mixture head, epochs)
    "k1": (1, 1.0, INIT, 12),
    "k4-a0.1": (4, 0.1, INIT, 12),
    "k4-a0.3": (4, 0.3, INIT, 12),
    "k4-a1": (4, 1.0, INIT, 12),
    "k8-a0.3": (8, 0.3, INIT, 12),
    # ablation: the head's output layer at PyTorch's default init instead of 0.1x of it
    "k4-a0.3-init1": (4, 0.3, 1.0, 12),
    # twice the training: does the structure grow with it?
    "k4-a0.3-24ep": (4, 0.3, INIT, 24),
}
# the evaluation of every encoder: the authors' linear and MLP classifiers and kNN on frozen
# features, in this process (workers + compute threads must not exceed the cores)
EVALUATION = EvaluationConfig(mode="features", device="cpu", workers=0)
# the 16 validation images drawn for every run: fixed by this seed before any run finished
PICTURE_SEED, N_PICTURES = 18, 16


def picture_indices(n_val: int) -> list[int]:
    """The validation images to draw, in index order (the set is classes-sorted)."""
    chosen = np.random.default_rng(PICTURE_SEED).choice(n_val, N_PICTURES, replace=False)
    return sorted(chosen.tolist())


def pretrain_flags(name: str, data: str, root: str) -> list[str]:
    n_mixtures, alpha, _, epochs = RUNS[name]
    # imagenette-cpu's 40 epochs and milestones (32, 37), scaled: 12 -> (10, 11), 24 -> (20, 22)
    milestones = [str(epochs * 5 // 6), str(epochs * 11 // 12)]
    return COMMON + ["--data", data, "--run-dir", str(Path(root) / name), "--epochs", str(epochs),
                     "--lr-milestones", *milestones,
                     "--n-mixtures", str(n_mixtures), "--mixture-entropy", str(alpha)]


def shrink_png(path: Path) -> None:
    """Rewrite a PNG with a 256-colour palette: a third of the size, for the README."""
    from PIL import Image

    Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)


def commit() -> str:
    """The checkout's commit ("" outside git)."""
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], text=True,
                          capture_output=True).stdout.strip()


def train(args: argparse.Namespace) -> None:
    cli = argparse.ArgumentParser(prog="amdim")  # the flags read exactly as `amdim pretrain`
    register_pretrain(cli.add_subparsers())
    for name in args.names:
        flags = pretrain_flags(name, args.data, args.root)
        cfg = config_from_args(cli.parse_args(["pretrain", *flags]))
        mixture.OUTPUT_INIT_SCALE = RUNS[name][2]  # read when the head is built
        start = time.perf_counter()
        metrics = pretrain(cfg)
        result = {"name": name, "head_init_scale": RUNS[name][2], "commit": commit(),
                  "command": "amdim pretrain " + " ".join(flags),
                  "wall_s": round(time.perf_counter() - start, 1), "final": metrics}
        (Path(cfg.run_dir) / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: v for k, v in metrics.items() if "acc" in k}), flush=True)


def random_model(cfg: PretrainConfig, n_mixtures: int, n_classes: int):
    """Encoder and mixture head (eval mode) exactly as pretraining with K components starts."""
    torch.manual_seed(cfg.seed)
    model = AMDIM(PretrainConfig.from_dict({**cfg.to_dict(), "n_mixtures": n_mixtures}),
                  n_classes)
    return model.encoder.eval(), model.mixture_head.eval()


def centre_contrast(maps: torch.Tensor) -> dict[str, float]:
    """A figure/ground proxy (Imagenette's objects mostly fill the middle of the picture): how
    much more often border locations than the 3x3 centre leave the centre's most common
    component. `shuffled`: the same for each map's own labels put in random places (what no
    spatial structure gives; not 0, as the centre's mode is picked from the centre).

    maps: (B, K, H, W) posterior."""
    labels = maps.argmax(1).flatten(1)  # (B, K, H, W) -> (B, H*W)
    size = maps.shape[-1]
    centre = torch.zeros(size, size, dtype=torch.bool)
    centre[size // 2 - 1:size // 2 + 2, size // 2 - 1:size // 2 + 2] = True
    centre = centre.flatten()

    def contrast(labels: torch.Tensor) -> float:
        mode = labels[:, centre].mode(1).values[:, None]  # (B, 1)
        leave = labels != mode
        return (leave[:, ~centre].double().mean() - leave[:, centre].double().mean()).item()

    generator = torch.Generator().manual_seed(PICTURE_SEED)
    places = torch.rand(labels.shape, generator=generator).argsort(1)
    return {"contrast": contrast(labels), "shuffled": contrast(labels.gather(1, places))}


@torch.no_grad()
def structure(encoder, head, images: torch.Tensor, alpha: float, batch_size: int,
              tclip: float) -> dict:
    """Spatial structure of the posterior over every image, batch by batch (the other images of
    a batch are its NCE negatives, as in training), and how decisively the components differ:
    score_gap_nats, the mean over locations of the NCE log-probability of the component that
    predicts the location best minus that of the worst (0: identical components)."""
    maps, gaps = {"r7": [], "r5": []}, {"r7": [], "r5": []}
    for start in range(0, len(images), batch_size):
        features = encoder(images[start:start + batch_size])
        sources = head(features.r1.flatten(1))  # (B, D) -> (B, K, D)
        for name in maps:
            target = getattr(features, name)
            log_prob, _ = nce_log_probs(sources, target, tclip)  # (B, K, H*W)
            maps[name].append(torch.softmax(log_prob / alpha, 1).view(*log_prob.shape[:2],
                                                                     *target.shape[2:]))
            gaps[name].append(log_prob.amax(1) - log_prob.amin(1))
    report = {}
    for name in maps:
        posterior = torch.cat(maps[name])
        usage = torch.bincount(posterior.argmax(1).flatten(), minlength=posterior.shape[1])
        coherence, within = spatial_coherence(posterior), within_image_structure(posterior)
        # agreement above the within-image chance, as a fraction of the most there is to gain
        kappa = ((coherence["agreement"] - within["chance_within_image"])
                 / (1 - within["chance_within_image"]))
        report[name] = {**coherence, **within, "kappa_within_image": kappa,
                        "score_gap_nats": torch.cat(gaps[name]).mean().item(),
                        "centre_contrast": centre_contrast(posterior),
                        "usage": (usage / usage.sum()).tolist()}
    return report


def report(args: argparse.Namespace) -> None:
    root = Path(args.root)
    finished = {name: RUNS[name] for name in RUNS if (root / name / "result.json").exists()}
    if "k1" not in finished:
        raise SystemExit(f"no finished k1 run under {root}: train it first (it is the baseline)")
    if len(finished) < len(RUNS):
        print(f"reporting without the unfinished {sorted(set(RUNS) - set(finished))}")
    cfg = PretrainConfig.from_dict(json.loads((root / "k1" / "config.json").read_text()))
    _, test, n_classes = build_datasets(cfg)
    order = torch.from_numpy(np.random.default_rng(PICTURE_SEED).permutation(len(test)))
    print(f"decoding {len(test)} validation images", flush=True)
    images = torch.stack([test[int(i)][0] for i in order])  # shuffled: batches mix classes
    shown = picture_indices(len(test))
    shown_images = torch.stack([test[i][0] for i in shown])
    k1_encoder = load_model(root / "k1" / "checkpoint.pt")[0]
    models = {}  # label -> (encoder, head, alpha): the controls, then the mixture runs
    drawn_as = {}  # label -> its row title in the figure (the K=4 controls and every run)
    for n_mixtures in (4, 8):
        encoder, head = random_model(cfg, n_mixtures, n_classes)
        for label, model_encoder in ((f"random init, K={n_mixtures} head", encoder),
                                     (f"K=1 encoder, untrained K={n_mixtures} head", k1_encoder)):
            models[label] = (model_encoder, head, 1.0)
            if n_mixtures == 4:
                drawn_as[label] = label
    for name, (n_mixtures, alpha, init_scale, epochs) in finished.items():
        if n_mixtures > 1:
            encoder, head, saved = load_mixture_model(root / name / "checkpoint.pt")
            models[name] = (encoder, head, saved.mixture_entropy)
            drawn_as[name] = (f"K={n_mixtures}, alpha={alpha:g}"
                              + (f", head init {init_scale:g}x" if init_scale != INIT else "")
                              + (f", {epochs} epochs" if epochs != 12 else ""))
    results = {"command": "python benchmarks/mixture_imagenette.py report "
                          + " ".join(f"--{k} {shlex.quote(str(v))}" for k, v in vars(args).items()
                                    if k != "func" and v),
               "machine": f"{platform.processor() or platform.machine()}, "
                          f"{len(os.sched_getaffinity(0))} usable cores, torch {torch.__version__}",
               "commit": commit(), "note": args.note,
               "common_config": {k: v for k, v in cfg.to_dict().items()
                                 if k not in ("n_mixtures", "mixture_entropy", "run_dir")},
               "pictures": {"indices": shown, "seed": PICTURE_SEED},
               "structure_images": len(images), "runs": {}, "controls": {}}
    for name, (n_mixtures, alpha, init_scale, epochs) in finished.items():
        print(f"evaluating {name}", flush=True)
        result = json.loads((root / name / "result.json").read_text())
        evaluation = evaluate_checkpoint(str(root / name / "checkpoint.pt"),
                                         cfg=EVALUATION,
                                         out=str(root / name / "eval.json"))
        results["runs"][name] = {
            "n_mixtures": n_mixtures, "alpha": alpha if n_mixtures > 1 else None,
            "head_init_scale": init_scale if n_mixtures > 1 else None, "epochs": epochs,
            **{k: result.get(k) for k in ("command", "commit", "wall_s", "final")},
            "evaluate": evaluation}
    # the same architecture at random init (the first control's encoder), evaluated the same way
    results["controls"]["random init, K=4 head"] = {"evaluate": evaluate_checkpoint(
        str(random_init_copy(root / "k1" / "checkpoint.pt")),
        cfg=EVALUATION, out=str(root / "random-init.eval.json"))}
    maps = {}
    for label, (encoder, head, alpha) in models.items():
        print(f"posterior of {label}", flush=True)
        entry = (results["runs"][label] if label in RUNS
                 else results["controls"].setdefault(label, {}))
        entry["structure"] = structure(encoder, head, images, alpha, cfg.batch_size, cfg.tclip)
        maps[label] = posterior_maps(encoder, head, shown_images, alpha=alpha)
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    drawn = pictures(shown_images, *normalisation(cfg.data)).numpy()
    for scale in ("r7", "r5"):
        path = docs / f"mixtures-imagenette-{scale}.png"
        compare_maps(drawn, {title: maps[label][scale] for label, title in drawn_as.items()}, path,
                     dpi=64)  # 64 px images
        shrink_png(path)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out} and {docs}/mixtures-imagenette-r7.png, -r5.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(required=True)
    run = commands.add_parser("train", help="pretrain the named settings in turn")
    run.add_argument("names", nargs="+", choices=sorted(RUNS))
    run.add_argument("--data", default=DATA)
    run.add_argument("--root", default="runs/mixtures-imagenette")
    run.set_defaults(func=train)
    summary = commands.add_parser("report", help="measure the finished runs; draw the maps")
    summary.add_argument("--root", default="runs/mixtures-imagenette")
    summary.add_argument("--out", default="benchmarks/results/cpu-imagenette-mixtures.json")
    summary.add_argument("--docs", default="docs")
    summary.add_argument("--note", default="", help="anything the JSON should say about the runs")
    summary.set_defaults(func=report)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
