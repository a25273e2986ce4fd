"""The README's results of a finished run, next to the same architecture at random init.

    python benchmarks/cpu_results.py runs/cifar-cpu --wall-s 3100 \\
        --command "amdim pretrain --preset cifar-cpu --data ../shared/data/cifar10_jpeg_train.npz ..." \\
        --out benchmarks/results/cpu-cifar-cpu.json

Evaluates the run's checkpoint with `amdim evaluate --mode features` (the authors' linear and
MLP classifiers retrained on frozen features, and kNN), and a copy of it whose encoder is
replaced by a fresh random initialisation of the same architecture (same seed rule as
pretraining), evaluated the same way. Writes one JSON: the run's command, wall time, machine,
config, every metrics.jsonl line, the final probe line if the run printed one, and both
evaluations.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from amdim.evaluation.classifier_training import EvaluationConfig
from amdim.evaluation.evaluate import evaluate_checkpoint
from amdim.model.encoder import Encoder
from amdim.training import checkpoint


def random_init_copy(path: Path) -> Path:
    """The checkpoint with its encoder freshly initialised (torch.manual_seed(seed) then the
    Encoder, as pretraining starts)."""
    state = checkpoint.load(path)
    torch.manual_seed(state["config"]["seed"])
    cfg = checkpoint.load_encoder(path).cfg
    state["encoder"] = Encoder(cfg).state_dict()
    out = path.with_name("random-init.pt")
    checkpoint.save_atomic(state, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--command", required=True, help="the pretraining command, as run")
    parser.add_argument("--wall-s", type=float, required=True, help="its wall time")
    parser.add_argument("--final-probe", help="JSON file of the run's printed final metrics")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    run = Path(args.run_dir)
    trained = run / "checkpoint.pt"
    results = {
        "command": args.command, "wall_s": args.wall_s,
        "machine": f"{platform.processor() or platform.machine()}, "
                   f"{len(os.sched_getaffinity(0))} usable cores, torch {torch.__version__}",
        "config": json.loads((run / "config.json").read_text()),
        "metrics": [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()],
        "final": json.loads(Path(args.final_probe).read_text()) if args.final_probe else None,
    }
    cfg = EvaluationConfig(mode="features", device="cpu")
    for name, path in (("trained", trained), ("random_init", random_init_copy(trained))):
        start = time.perf_counter()
        report = evaluate_checkpoint(str(path), cfg=cfg, out=str(run / f"{name}.eval.json"))
        results[name] = {**report, "evaluate_s": round(time.perf_counter() - start, 1)}
        print(name, {k: v for k, v in report.items() if "acc" in k or "top" in k}, flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
