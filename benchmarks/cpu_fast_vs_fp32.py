"""Does the fast CPU path (bf16 autocast, channels-last, batched views) learn as well as the
plain fp32 path, at equal steps? And how much faster is the README's main command?

    python benchmarks/cpu_fast_vs_fp32.py --out benchmarks/results/cpu-fast-vs-fp32.json

Runs `amdim pretrain` twice per setting, same seed and steps: "fp32" as the package ran
before the fast path (fp32, NCHW, PIL views in the training process) and "fast" (today's
defaults on this machine). Settings: the main command (digits, 6 epochs, linear probe on
frozen features by scikit-learn's logistic regression), and one epoch of the cifar-cpu preset
on the shared CIFAR-10 (online linear and MLP probes on the whole test set). Records wall
time and accuracies per run and the differences.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEFORE = ["--precision", "fp32", "--no-channels-last", "--data-path", "loader", "--workers", "0"]
SETTINGS = {
    "digits main command": [],
    "cifar-cpu, 1 epoch": ["--preset", "cifar-cpu", "--epochs", "1", "--no-final-probe"],
}


def run(args: list[str], run_dir: Path) -> dict:
    argv = [sys.executable, "-m", "amdim", "pretrain", *args, "--run-dir", str(run_dir)]
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    metrics = json.loads(done.stdout[done.stdout.index("{"):])
    config = json.loads((run_dir / "config.json").read_text())
    return {"command": "amdim pretrain " + " ".join(args), "wall_s": round(seconds, 1),
            "precision": config["precision"], "channels_last": config["channels_last"],
            "threads": config["threads"], "workers": config["workers"],
            **{k: metrics[k] for k in ("step", "loss", "test_linear_acc", "test_mlp_acc",
                                       "final_linear_probe_acc", "random_init_linear_probe_acc",
                                       "images_per_s") if k in metrics}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10_jpeg_train.npz"))
    parser.add_argument("--only", choices=sorted(SETTINGS), help="run one setting")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    results = {"command": "python benchmarks/cpu_fast_vs_fp32.py " + " ".join(sys.argv[1:]),
               "machine": f"{platform.processor() or platform.machine()}, "
                          f"{len(os.sched_getaffinity(0))} usable cores",
               "settings": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for name, setting in SETTINGS.items():
            if args.only and name != args.only:
                continue
            if "cifar" in name:
                setting = setting + ["--data", args.data]
            pair = {mode: run(setting + extra, Path(scratch) / f"{name}-{mode}".replace(" ", "_"))
                    for mode, extra in (("fp32", BEFORE), ("fast", []))}
            key = "final_linear_probe_acc" if "final_linear_probe_acc" in pair["fast"] \
                else "test_linear_acc"
            pair["speedup_wall"] = pair["fp32"]["wall_s"] / pair["fast"]["wall_s"]
            pair["linear_acc_difference_points"] = 100 * (pair["fast"][key] - pair["fp32"][key])
            results["settings"][name] = pair
            print(json.dumps({name: pair}, indent=2), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
