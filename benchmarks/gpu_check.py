"""The whole GPU validation of the package, one command: run it the moment a GPU is at hand.

    python benchmarks/gpu_check.py                      # every part, about 20 minutes on an H100
    python benchmarks/gpu_check.py --part benchmark     # one part (each at most 9 minutes)
    python benchmarks/gpu_check.py --smoke              # tiny settings on the CPU, seconds (CI)

Parts:
  tests      the `gpu`-marked tests, among them training steps under
             torch.cuda.set_sync_debug_mode("error") between log points (tests/test_step.py)
  benchmark  `amdim benchmark`, bf16, step and end to end on the shared data: cifar-small and
             cifar-paper on CIFAR-10, imagenet-small on Imagenette, compiled and eager
  cifar      6 minutes of `amdim pretrain --preset cifar-small` on CIFAR-10, then
             `amdim evaluate --mode features` (linear, MLP, kNN) on its checkpoint
  mixture    a short K=4 mixture run on Imagenette-128, then `amdim segment` (maps under docs/
             where matplotlib is installed; else the command to draw them elsewhere)

Each part writes one JSON (its commands, device, torch version, git commit, results) under
--out, and a summary table is printed at the end. The package runs from this source tree
(PYTHONPATH=src), so nothing needs installing on the GPU machine; the .npz datasets are read
from --data (default: ../shared/data, else data/).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("tests", "benchmark", "cifar", "mixture")
# --smoke's pretraining: a tiny model, 2 steps on the embedded digits
SMOKE_PRETRAIN = ["--preset", "digits", "--epochs", "1", "--steps-per-epoch", "2", "--ndf", "8",
                  "--n-rkhs", "64", "--batch-size", "16"]


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Check:
    """Runs the commands of the parts, keeps what they printed and returned."""

    def __init__(self, args: argparse.Namespace):
        self.smoke, self.out, self.docs = args.smoke, Path(args.out), Path(args.docs)
        self.data = Path(args.data) if args.data else next(
            (p for p in (ROOT.parent / "shared" / "data", ROOT / "data") if p.is_dir()),
            ROOT / "data")
        self.device = "cpu" if args.smoke else "cuda"
        self.env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        self.scratch = self.out / ("smoke-runs" if args.smoke else "runs")

    def amdim(self, *args: str, timeout: float = 540) -> dict:
        """`python -m amdim ARGS`; returns its command, seconds, exit status and last lines."""
        return self.command([sys.executable, "-m", "amdim", *args], timeout)

    def command(self, argv: list[str], timeout: float) -> dict:
        start = time.perf_counter()
        try:
            done = subprocess.run(argv, cwd=ROOT, env=self.env, capture_output=True, text=True,
                                  timeout=timeout)
            status, output = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as error:
            status, output = "timeout", f"{error.stdout or ''}{error.stderr or ''}"
        shown = " ".join(a if a != sys.executable else "python" for a in argv)
        print(f"[{status}] {shown} ({time.perf_counter() - start:.0f} s)", flush=True)
        return {"command": shown, "seconds": round(time.perf_counter() - start, 1),
                "status": status, "output_tail": output[-3000:]}

    def npz(self, name: str) -> str:
        return str(self.data / name)

    # -- the parts

    def tests(self) -> dict:
        argv = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
        if self.smoke:  # on the CPU the gpu tests skip: prove the selection works
            argv += ["tests/test_step.py"]
        return {"pytest": self.command(argv, 540)}

    def benchmark(self) -> dict:
        runs = {}
        configs = [("digits", None)] if self.smoke else [
            ("cifar-small", "cifar10_jpeg_train.npz"), ("cifar-paper", "cifar10_jpeg_train.npz"),
            ("imagenet-small", "imagenette128_train.npz")]
        for preset, data in configs:
            for compile in (["--no-compile"] if self.smoke else ["--compile", "--no-compile"]):
                name = f"{preset}{'' if compile == '--compile' else '-eager'}"
                path = self.out / f"{self._tag()}-benchmark-{name}.json"
                args = ["benchmark", "--preset", preset, "--precision", "bf16", compile,
                        "--device", self.device, "--out", str(path)]
                args += ["--steps", "2", "--warmup", "1"] if self.smoke else ["--steps", "30"]
                if data:
                    args += ["--data", self.npz(data)]
                runs[name] = {**self.amdim(*args, timeout=300), "results": _read(path)}
        return runs

    def pretrain(self, run: Path, real: list[str], *extra: str, timeout: float) -> dict:
        """`amdim pretrain` in bf16 into run: with the `real` settings, or in smoke mode a
        tiny model for 2 steps on digits; `extra` flags in both."""
        train = SMOKE_PRETRAIN if self.smoke else real
        return self.amdim("pretrain", *train, *extra, "--precision", "bf16", "--no-final-probe",
                          "--device", self.device, "--run-dir", str(run), timeout=timeout)

    def cifar(self) -> dict:
        run = self.scratch / "cifar-small"
        pretrain = self.pretrain(run, [
            "--preset", "cifar-small", "--data", self.npz("cifar10_jpeg_train.npz"),
            "--epochs", "30", "--lr-milestones", "24", "28", "--time-limit", "6"], timeout=480)
        report = run / "checkpoint.eval-features.json"
        evaluate = self.amdim("evaluate", str(run / "checkpoint.pt"), "--mode", "features",
                              "--device", self.device, "--out", str(report),
                              *(["--epochs", "1"] if self.smoke else []), timeout=300)
        return {"pretrain": pretrain, "metrics": _read_lines(run / "metrics.jsonl"),
                "evaluate": evaluate, "evaluation": _read(report)}

    def mixture(self) -> dict:
        run = self.scratch / "mixture-k4"
        pretrain = self.pretrain(run, [
            "--preset", "imagenet-small", "--data", self.npz("imagenette128_train.npz"),
            "--epochs", "20", "--lr-milestones", "16", "--warmup-steps", "100",
            "--time-limit", "5"], "--n-mixtures", "4", timeout=420)
        maps = self.docs / f"{self._tag()}-mixture-k4-segments.png"
        segment = ["segment", str(run / "checkpoint.pt"), "--out", str(maps), "--n-images", "16",
                   "--spatial-coherence", "--device", self.device]
        try:
            import matplotlib  # noqa: F401 (the maps need it)
        except ImportError:
            return {"pretrain": pretrain, "segment": "matplotlib is not installed here: draw "
                    "the maps where it is with `amdim " + " ".join(segment) + "`"}
        drawn = self.amdim(*segment, timeout=120)
        return {"pretrain": pretrain, "segment": drawn,
                "coherence": _read(maps.with_suffix(".json"))}

    def _tag(self) -> str:
        return "smoke" if self.smoke else "h100"


def _read(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _read_lines(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in Path(path).read_text().splitlines()]
    except (OSError, json.JSONDecodeError):
        return []


def _device_name(smoke: bool) -> str:
    import torch

    if not smoke and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "cpu"


def _failed(value) -> bool:
    """Whether any command inside a part's result failed."""
    if isinstance(value, dict):
        if "status" in value and value.get("status") != 0:
            return True
        return any(_failed(v) for v in value.values())
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=PARTS, action="append",
                        help="run only this part (repeatable; default: all)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny settings on the CPU, seconds: checks that the script runs")
    parser.add_argument("--data", help="folder of the .npz datasets (default: ../shared/data, "
                                       "else data/)")
    parser.add_argument("--out", help="where the JSON results go (default: benchmarks/results; "
                                      "with --smoke a temporary folder)")
    parser.add_argument("--docs", help="where figures go (default: docs; with --smoke the "
                                       "--out folder)")
    args = parser.parse_args(argv)
    if args.smoke:  # smoke results are no results: never beside the real ones
        args.out = args.out or tempfile.mkdtemp(prefix="amdim-gpu-check-smoke-")
        args.docs = args.docs or args.out
    args.out = args.out or str(ROOT / "benchmarks" / "results")
    args.docs = args.docs or str(ROOT / "docs")
    check = Check(args)
    if not args.smoke:
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA device here: run with --smoke on a CPU")
    check.out.mkdir(parents=True, exist_ok=True)
    check.docs.mkdir(parents=True, exist_ok=True)
    import torch

    summary = []
    for part in args.part or PARTS:
        start = time.perf_counter()
        results = getattr(check, part)()
        record = {"part": part, "device": _device_name(args.smoke), "torch": torch.__version__,
                  "commit": _commit(), "smoke": args.smoke,
                  "command": "python benchmarks/gpu_check.py " + " ".join(argv or sys.argv[1:]),
                  "seconds": round(time.perf_counter() - start, 1), "results": results}
        (check.out / f"{check._tag()}-gpu-check-{part}.json").write_text(
            json.dumps(record, indent=2) + "\n")
        summary.append((part, "FAILED" if _failed(results) else "ok", record["seconds"]))
    print("\npart        status   seconds")
    for part, status, seconds in summary:
        print(f"{part:<11} {status:<8} {seconds:>7.0f}")
    return 1 if any(status != "ok" for _, status, _ in summary) else 0


if __name__ == "__main__":
    sys.exit(main())
