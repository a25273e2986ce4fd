"""The GPU check: one command per device window, inside one deadline, most valuable step first.

    python3 benchmarks/gpu_check.py prepare            # here: the data/ folder and what travels
    python3 benchmarks/gpu_check.py run --out $OUT     # on the GPU machine (about 8 minutes)
    python3 benchmarks/gpu_check.py run --smoke        # on a CPU, tiny settings (CI, the tests)

`run` works through STEPS in order under a global deadline (--budget seconds): each step gets
min(its cap, the time left) and is not started with less than it needs. After every step it
rewrites one results JSON, so a command killed at its limit keeps every finished step; each
command's output streams into a log beside it; progress lines are printed as they happen.
Steps measured ok in the committed results of the same device (benchmarks/results/
<tag>-gpu-check-*.json) are not run again, so successive windows advance (--redo runs all).
`prepare` plans the next window the same way, copies the .npz files its steps need from
../shared/data into the git-ignored data/ folder, and refuses to let more than 60 MiB travel.
The package runs from this tree (PYTHONPATH=src): nothing is installed on the GPU machine.
benchmarks/README.md gives the exact device call.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TRAVEL_LIMIT = 60 * 2**20  # bytes: the device call carries at most 64 MiB; keep a margin
CIFAR = ("cifar10_jpeg_train.npz", "cifar10_jpeg_test.npz")
IMAGENETTE = ("imagenette128_train.npz", "imagenette128_val.npz")
EXIT_TIME_LIMIT = 75  # amdim pretrain stopped by --time-limit: a clean stop, resumable
EVALUATE_S = 120  # what a pretraining step keeps for what follows the run (start-up margin too)
NOT_POSSIBLE = {"ddp": "2-process DDP on the one GPU of the machine: NCCL refuses two ranks on "
                       "one device; the gloo equivalence tests (tests/training/"
                       "test_distributed.py) run on every CI run instead"}


@dataclass(frozen=True)
class Step:
    key: str
    about: str
    cap_s: float  # the most it may take
    need_s: float  # not started with less time left than this
    expect_s: float  # planned time on an H200 (an estimate until a window measures it)
    data: tuple[str, ...] = ()  # .npz files it reads from --data


STEPS = (  # most valuable first
    Step("environment", "device, torch, memory, a bf16 matmul ceiling", 60, 10, 10),
    Step("gpu-tests", "the gpu-marked tests (steps and views under sync debug 'error')",
         150, 40, 90),
    Step("step-cifar-small", "eager bf16 step and end to end on CIFAR-10", 90, 30, 35, CIFAR[:1]),
    # the run trains for what is left of its cap after EVALUATE_S, 3 to 4.5 minutes
    Step("cifar-run", "cifar-small pretraining on CIFAR-10, then amdim evaluate --mode features",
         390, 300, 300, CIFAR),
    Step("step-cifar-paper", "eager bf16 step of the paper's CIFAR model", 75, 25, 30),
    Step("step-imagenet-small", "eager bf16 step of imagenet-small at 128 px", 75, 25, 30),
    Step("compiled-cifar-small", "compiled step and end to end on CIFAR-10, compile apart",
         300, 120, 150, CIFAR[:1]),
    Step("compiled-cifar-paper", "compiled step and end to end on CIFAR-10, compile apart",
         360, 150, 200, CIFAR[:1]),
    Step("compiled-imagenet-small", "compiled step, compile apart", 360, 150, 200),
    Step("input-imagenet-small", "imagenet-small end to end from ImageNet-sized JPEGs: "
         "decoded on the GPU (folder, store) against PIL loader workers (8: the CUDA default)",
         240, 150, 180),
    Step("mixture-imagenette", "a K=4 mixture run on Imagenette, then its maps and coherence",
         420, 240, 330, IMAGENETTE),
)
# issue 22's targets: (step, where its value is in the step's record, at least)
TARGETS = {
    "no host sync between log points (the gpu tests pass)": ("gpu-tests", "status", "ok"),
    "cifar-paper end to end, bf16 compiled, images/s": (
        "compiled-cifar-paper", "results.end_to_end_images_per_s", 8000),
    "cifar-small end to end, bf16 compiled, images/s": (
        "compiled-cifar-small", "results.end_to_end_images_per_s", 25000),
    "imagenet-small step, bf16 compiled, images/s": (
        "compiled-imagenet-small", "results.train_images_per_s", 2500),
    "imagenet-small end to end from a store, decoded on the GPU, fraction of its step": (
        "input-imagenet-small", "fraction_of_step.decode-store", 0.9),
    "CIFAR-10 linear accuracy after cifar-small training (4 minutes asked)": (
        "cifar-run", "evaluation.linear_top1", 0.80),
}


def device_tag(name: str) -> str:
    """'NVIDIA H200' -> 'h200', 'NVIDIA A100-SXM4-80GB' -> 'a100'; 'gpu' when no model shows."""
    found = re.search(r"\b([A-Z]{1,2}\d{2,4})\b", name)
    return found.group(1).lower() if found else "gpu"


def measured(tag: str, results: Path = RESULTS) -> dict[str, str]:
    """{step key: file} of the steps measured ok in the committed results of this device."""
    done = {}
    for path in sorted(results.glob(f"{tag}-gpu-check-*.json")):
        record = _read(path) or {}
        for key, step in record.get("steps", {}).items():
            if step.get("status") == "ok":
                done[key] = path.name
    return done


def plan(done: dict[str, str], budget: float) -> tuple[list[Step], list[Step]]:
    """(the steps the next window runs, those left for a later one): the steps not yet
    measured, in order, while their expected times fit the budget and their data the limit."""
    chosen, later, seconds, files = [], [], 0.0, set()
    for step in STEPS:
        if step.key in done:
            continue
        needed = files | set(step.data)
        fits = (seconds + step.expect_s <= budget or step.key == "environment") and \
            sum(_shared_size(name) for name in needed) + _repo_size() <= TRAVEL_LIMIT
        if fits:
            chosen.append(step)
            seconds, files = seconds + step.expect_s, needed
        else:
            later.append(step)
    return chosen, later


# -- what travels

def _repo_files() -> list[Path]:
    """Tracked files and untracked ones git does not ignore: what the device call copies."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode()
    return [ROOT / name for name in listed.split("\0") if name and (ROOT / name).is_file()]


def _repo_size() -> int:
    return sum(path.stat().st_size for path in _repo_files())


def _shared_size(name: str) -> int:
    path = ROOT.parent / "shared" / "data" / name
    return path.stat().st_size if path.exists() else 0


def prepare(args: argparse.Namespace) -> int:
    done = {} if args.redo else measured(args.tag)
    chosen, later = plan(done, args.budget)
    source, data = Path(args.source), ROOT / "data"
    needed = sorted({name for step in chosen for name in step.data})
    missing = [name for name in needed if not (source / name).exists()]
    if missing:
        print(f"gpu_check prepare: {', '.join(missing)} not in {source}: give --source",
              file=sys.stderr)
        return 1
    data.mkdir(exist_ok=True)
    for old in data.glob("*.npz"):  # the folder carries exactly this window's files
        if old.name not in needed:
            old.unlink()
    for name in needed:
        if not (data / name).exists() or \
                (data / name).stat().st_size != (source / name).stat().st_size:
            shutil.copyfile(source / name, data / name)
    repo, carried = _repo_size(), sum(p.stat().st_size for p in data.glob("*.npz"))
    print(f"already measured on {args.tag}: {', '.join(sorted(done)) or 'nothing'}")
    print("this window, in order: "
          + ", ".join(f"{s.key} (~{s.expect_s:.0f} s)" for s in chosen))
    print(f"left for a later window: {', '.join(s.key for s in later) or 'nothing'}")
    print(f"travels: repo {repo / 2**20:.1f} MiB + data/ {carried / 2**20:.1f} MiB "
          f"({', '.join(needed) or 'no data'}) = {(repo + carried) / 2**20:.1f} MiB "
          f"(limit {TRAVEL_LIMIT / 2**20:.0f} MiB)")
    if repo + carried > TRAVEL_LIMIT:
        print("gpu_check prepare: too much would travel: remove untracked files from the tree",
              file=sys.stderr)
        return 1
    print('device call: run(command="python3 benchmarks/gpu_check.py run --data data --out '
          f'$OUT 2>&1 | tee $OUT/console.txt", carry=["data"], '
          f'timeout_s={int(args.budget) + 60})')
    return 0


# -- running the steps

class Check:
    """Runs the steps under one deadline; keeps the record and rewrites it after each."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.smoke = args, args.smoke
        self.deadline = time.monotonic() + args.budget
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.scratch = Path(args.scratch or tempfile.mkdtemp(prefix="amdim-gpu-check-"))
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.data = Path(args.data)
        self.device = "cpu" if self.smoke else "cuda"
        self.env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1"}
        self.stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        self.tag = "smoke" if self.smoke else "gpu"
        self.log = None
        self.record = {"check": "benchmarks/gpu_check.py", "command": " ".join(
            ["python3 benchmarks/gpu_check.py", *sys.argv[1:]]), "commit": _commit(),
            "budget_s": args.budget, "smoke": self.smoke, "started_utc": self.stamp,
            "not_possible": NOT_POSSIBLE, "measured_before": {}, "steps": {}, "finished": False}

    @property
    def left(self) -> float:
        return self.deadline - time.monotonic()

    @property
    def step_left(self) -> float:
        return self.step_end - time.monotonic()

    def say(self, line: str) -> None:
        text = f"[{self.args.budget - self.left:5.0f} s] {line}"
        print(text, flush=True)
        if self.log:
            self.log.write(text + "\n")
            self.log.flush()

    def save(self) -> None:
        self.record["targets"] = reached(self.record["steps"])
        path = self.out / f"{self.tag}-gpu-check-{self.stamp}.json"
        temporary = path.with_suffix(".json.tmp")  # a kill mid-write leaves the last good file
        temporary.write_text(json.dumps(self.record, indent=2) + "\n")
        os.replace(temporary, path)

    def command(self, argv: list[str], timeout: float) -> dict:
        """Run argv (output streamed into the log) for at most `timeout` seconds; then SIGTERM
        (a pretraining run saves), and SIGKILL 20 s later. Returns what it did."""
        shown = " ".join("python3" if a == sys.executable else a for a in argv)
        self.say(f"$ {shown}")
        self.log.flush()
        start, offset = time.monotonic(), os.path.getsize(self.log.name)
        process = subprocess.Popen(argv, cwd=ROOT, env=self.env, stdout=self.log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            status = process.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            status = "timeout"
        with open(self.log.name, "rb") as f:
            f.seek(offset)
            output = f.read().decode(errors="replace")
        seconds = round(time.monotonic() - start, 1)
        self.say(f"  -> {status} after {seconds} s")
        return {"command": shown, "seconds": seconds, "status": status,
                "output_tail": output[-2500:]}

    def amdim(self, *args: str, timeout: float) -> dict:
        return self.command([sys.executable, "-m", "amdim", *args], timeout)

    def run(self) -> int:
        self.log = open(self.scratch / "console.log", "w+")
        env = self._environment()
        self.tag = "smoke" if self.smoke else device_tag(env.get("results", {}).get("device", ""))
        self.log.close()  # the log lives beside the results from here on
        log_path = self.out / f"{self.tag}-gpu-check-{self.stamp}.log"
        shutil.move(self.scratch / "console.log", log_path)
        self.log = open(log_path, "a+")
        done = {} if self.args.redo or self.smoke else measured(self.tag)
        self.record.update(tag=self.tag, measured_before=done)
        self.record["steps"]["environment"] = env
        self.save()
        wanted = self.args.only or [s.key for s in STEPS]
        for step in STEPS[1:]:
            if step.key not in wanted:
                continue
            if step.key in done:
                self.say(f"{step.key}: measured in {done[step.key]}, not run again")
                continue
            self.record["steps"][step.key] = self._step(step)
            self.save()
        self.record["finished"] = True
        self.record["seconds"] = round(self.args.budget - self.left, 1)
        self.save()
        self.say(f"{'step':<24} status")
        for key, result in self.record["steps"].items():
            why = f" ({result['why']})" if result.get("why") else ""
            self.say(f"{key:<24} {result['status']}{why}")
        return 1 if any(r["status"] == "failed" for r in self.record["steps"].values()) else 0

    def _environment(self) -> dict:
        result = self.command([sys.executable, __file__, "environment", "--device", self.device,
                               "--json", str(self.scratch / "environment.json")], 60)
        return {**result, "status": "ok" if result["status"] == 0 else "failed",
                "results": _read(self.scratch / "environment.json") or {}}

    def _step(self, step: Step) -> dict:
        if self.left < step.need_s:
            self.say(f"{step.key}: {self.left:.0f} s left, it needs {step.need_s:.0f}: "
                     "next window")
            return {"status": "skipped", "why": f"{self.left:.0f} s left, needs {step.need_s:.0f}"}
        absent = [name for name in step.data if not (self._npz(name)).exists()]
        if absent:
            self.say(f"{step.key}: {', '.join(absent)} not carried: next window")
            return {"status": "skipped", "why": f"data not carried: {', '.join(absent)}"}
        self.say(f"{step.key}: {step.about} (at most {min(step.cap_s, self.left):.0f} s)")
        start = time.monotonic()
        self.step_end = start + min(step.cap_s, self.left)
        try:
            commands = getattr(self, "step_" + step.key.replace("-", "_"))()
        except Exception as error:  # a bug of this script's own: the next steps still run
            self.say(f"{step.key}: {error!r}")
            commands = {"error": {"status": "error", "why": repr(error)}}
        return {"status": _status(commands), "seconds": round(time.monotonic() - start, 1),
                **commands}

    def _npz(self, name: str) -> Path:
        if self.smoke:  # tiny stand-ins made from the embedded digits, test splits with them
            for split in {name, name.replace("_train", "_test")}:
                _tiny_npz(self.scratch / "tiny", split)
            return self.scratch / "tiny" / name
        return self.data / name

    # -- the steps: each returns {name: command result or results}

    def step_gpu_tests(self) -> dict:
        argv = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
        if self.smoke:  # on a CPU the gpu tests skip: only the selection is checked
            argv.append("tests/training/test_step.py")
        return {"pytest": self.command(argv, self.step_left)}

    def _benchmark(self, name: str, preset: str, compile: bool, data: str | None = None) -> dict:
        path = self.scratch / f"{name}.json"
        args = ["benchmark", "--preset", "digits" if self.smoke else preset, "--precision",
                "bf16", "--compile" if compile else "--no-compile", "--device", self.device,
                "--out", str(path), *(["--steps", "2", "--warmup", "1"] if self.smoke
                                      else ["--steps", "30", "--warmup", "5"])]
        if data:
            args += ["--data", str(self._npz(data))]
        result = self.amdim(*args, timeout=self.step_left)
        if result["status"] == "timeout" and compile:
            result["why"] = f"the compile did not finish in {result['seconds']:.0f} s"
        return {"benchmark": result, "results": _read(path)}

    def step_step_cifar_small(self) -> dict:
        return self._benchmark("step-cifar-small", "cifar-small", False, CIFAR[0])

    def step_step_cifar_paper(self) -> dict:
        return self._benchmark("step-cifar-paper", "cifar-paper", False)

    def step_step_imagenet_small(self) -> dict:
        return self._benchmark("step-imagenet-small", "imagenet-small", False)

    def _compiled(self, name: str, preset: str, data: str | None = None) -> dict:
        if self.smoke:
            return {"benchmark": {"status": "skipped", "why": "no compile timed on a CPU"}}
        return self._benchmark(name, preset, True, data)

    def step_compiled_cifar_small(self) -> dict:
        return self._compiled("compiled-cifar-small", "cifar-small", CIFAR[0])

    def step_compiled_cifar_paper(self) -> dict:
        return self._compiled("compiled-cifar-paper", "cifar-paper", CIFAR[0])

    def step_compiled_imagenet_small(self) -> dict:
        return self._compiled("compiled-imagenet-small", "imagenet-small")

    def _model(self, preset: str) -> list[str]:
        return SMOKE_MODEL if self.smoke else ["--preset", preset]

    def _pretrain(self, run: Path, preset: str, data: str, rate: float | None, n_images: int,
                  *extra: str) -> dict:
        """amdim pretrain, eager bf16, into run for what the step has left but EVALUATE_S: the
        epochs that `rate` images/s (an end-to-end rate measured before, if any) fits, the lr
        decay in the last fifth as the presets' schedules, --time-limit as the backstop."""
        train_s = self.step_left - EVALUATE_S
        epochs = max(1, int(0.7 * train_s * (rate or 2000) / n_images))
        milestones = sorted({max(1, round(epochs * f)) for f in (0.8, 0.93)} - {epochs}) \
            if epochs >= 3 else []
        schedule = [] if self.smoke else ["--epochs", str(epochs), "--lr-milestones",
                                          *map(str, milestones)]
        return self.amdim("pretrain", *self._model(preset), *schedule, *extra, "--data",
                          str(self._npz(data)), "--precision", "bf16", "--no-compile",
                          "--no-final-probe", "--device", self.device, "--run-dir", str(run),
                          "--time-limit", f"{train_s / 60:.2f}",
                          timeout=self.step_left - EVALUATE_S / 2)

    def _rate(self, key: str) -> float | None:
        """The eager end-to-end images/s that step measured, in this window or before."""
        step = self.record["steps"].get(key)
        if step is None and key in self.record["measured_before"]:
            earlier = _read(RESULTS / self.record["measured_before"][key]) or {}
            step = earlier.get("steps", {}).get(key)
        return ((step or {}).get("results") or {}).get("end_to_end_images_per_s")

    def step_cifar_run(self) -> dict:
        run = self.scratch / "cifar-small"
        pretrain = self._pretrain(run, "cifar-small", CIFAR[0], self._rate("step-cifar-small"),
                                  50000)
        report = self.scratch / "cifar-small.eval-features.json"
        evaluate = self.amdim("evaluate", str(run / "checkpoint.pt"), "--mode", "features",
                              "--device", self.device, "--out", str(report),
                              *(["--epochs", "1"] if self.smoke else []),
                              timeout=self.step_left)
        metrics = _read_lines(run / "metrics.jsonl")
        return {"pretrain": pretrain, "evaluate": evaluate, "evaluation": _read(report),
                "accuracy_against_wall_time": [
                    {k: m.get(k) for k in ("epoch", "wall_s", "images_per_s", "test_linear_acc",
                                           "test_mlp_acc")} for m in metrics],
                "metrics": metrics}

    def step_input_imagenet_small(self) -> dict:
        corpus, store = self.scratch / "jpeg-corpus", self.scratch / "jpeg-store"
        images = "64" if self.smoke else "3000"
        made = self.command([sys.executable, str(ROOT / "benchmarks" / "jpeg_corpus.py"),
                             str(corpus), "--images", images], self.step_left)
        prepare = self.amdim("prepare", str(corpus), str(store), timeout=self.step_left)
        found = {"corpus": made, "prepare": prepare}
        model = ["--preset", "digits", "--batch-size", "16", "--steps", "2", "--warmup", "1"] \
            if self.smoke else ["--preset", "imagenet-small", "--steps", "20", "--warmup", "3"]
        for name, data, path in (("decode-store", store, "decode"),
                                 ("decode-folder", corpus, "decode"),
                                 ("loader-folder", corpus, "loader")):
            out = self.scratch / f"input-{name}.json"
            found[name] = self.amdim(
                "benchmark", *model, "--data", str(data / "train"), "--data-path", path,
                "--precision", "bf16", "--no-compile", "--device", self.device, "--out",
                str(out), timeout=self.step_left)
            found[name + "-results"] = results = _read(out)
            if results:
                found.setdefault("fraction_of_step", {})[name] = (
                    results["end_to_end_images_per_s"] / results["train_images_per_s"])
        return found

    def step_mixture_imagenette(self) -> dict:
        run = self.scratch / "mixture-k4"
        pretrain = self._pretrain(run, "imagenet-small", IMAGENETTE[0],
                                  self._rate("step-imagenet-small"), 9469, "--n-mixtures", "4")
        maps = self.out / f"{self.tag}-mixture-k4.png"
        segment = self.amdim("segment", str(run / "checkpoint.pt"), "--out", str(maps),
                             "--n-images", "16", "--spatial-coherence", "--device", self.device,
                             timeout=self.step_left)
        return {"pretrain": pretrain, "segment": segment,
                "coherence": _read(maps.with_name(maps.stem + "_coherence.json")),
                "metrics": _read_lines(run / "metrics.jsonl")}


# --smoke's pretraining: a tiny model for 2 steps
SMOKE_MODEL = ["--preset", "digits", "--epochs", "1", "--steps-per-epoch", "2", "--ndf", "8",
               "--n-rkhs", "64", "--batch-size", "16"]


def reached(steps: dict) -> dict:
    """Each target with the value this window measured (None: not measured here)."""
    out = {}
    for name, (key, where, goal) in TARGETS.items():
        value = steps.get(key)
        for part in where.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        met = None if value is None else value == goal if isinstance(goal, str) else value >= goal
        out[name] = {"step": key, "target": goal, "reached": value, "met": met}
    return out


def _status(commands: dict) -> str:
    """failed if a command inside failed (exit 75, a run stopped at its time limit, is a clean
    stop), else timeout if one was stopped at its time, skipped if all were, else ok."""
    statuses = [c["status"] for c in commands.values() if isinstance(c, dict) and "status" in c]
    if any(s not in (0, EXIT_TIME_LIMIT, "timeout", "skipped") for s in statuses):
        return "failed"
    if "timeout" in statuses:
        return "timeout"
    return "skipped" if statuses and set(statuses) == {"skipped"} else "ok"


def environment(device: str, out: str) -> None:
    """The device, torch, memory and a bf16 matmul ceiling (a few seconds), as JSON."""
    import platform

    import torch

    cuda = device == "cuda"
    where = torch.device(device)
    record = {"device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.machine()})",
              "torch": torch.__version__, "python": platform.python_version(),
              "cuda": torch.version.cuda, "cpu_cores": os.cpu_count(),
              "memory_bytes": torch.cuda.get_device_properties(0).total_memory if cuda else None}
    size, seconds = (8192, 2.0) if cuda else (256, 0.2)
    a, b = (torch.randn(size, size, device=where, dtype=torch.bfloat16) for _ in range(2))
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(20):
            a @ b
        if cuda:
            torch.cuda.synchronize()
        done += 20
    record["bf16_matmul_flop_per_s"] = 2 * size**3 * done / (time.perf_counter() - start)
    record["bf16_matmul_size"] = size
    Path(out).write_text(json.dumps(record, indent=2) + "\n")


def _tiny_npz(folder: Path, name: str) -> Path:
    """A tiny stand-in for a shared .npz, in its layout: 200 digits as 32 px JPEGs (100 for a
    _test or _val split). Made once per folder."""
    path = folder / name
    if path.exists():
        return path
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    part = slice(200, 300) if "_test" in name or "_val" in name else slice(0, 200)
    blobs = []
    for image in digits.images[part]:
        buffer = io.BytesIO()
        pixels = Image.fromarray((image * 255 / 16).astype(np.uint8))
        pixels.resize((32, 32)).convert("RGB").save(buffer, "JPEG")
        blobs.append(np.frombuffer(buffer.getvalue(), np.uint8))
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(path, jpeg=np.concatenate(blobs), offsets=np.cumsum([0] + [len(b) for b in blobs]),
             labels=digits.target[part].astype(np.int16),
             classes=np.array([str(c) for c in range(10)]),
             filenames=np.array([f"{i}.jpg" for i in range(len(blobs))]))
    return path


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the steps not yet measured, inside --budget")
    run.add_argument("--budget", type=float, default=500,
                     help="seconds for the whole command (default 500: inside a 10-minute "
                          "device command and a 15-minute window with its start-up)")
    run.add_argument("--smoke", action="store_true", help="tiny settings on the CPU (CI)")
    run.add_argument("--data", default=str(ROOT / "data"), help="folder of the .npz files "
                                                                "(default: data/, as prepared)")
    run.add_argument("--out", help="where the results JSON, the log and figures go (at most "
                                   "5 files; default with --smoke: a temporary folder)")
    run.add_argument("--scratch", help="run folders and other scratch (default: a temporary "
                                       "folder, never under --out)")
    run.add_argument("--only", action="append", choices=[s.key for s in STEPS[1:]],
                     help="run only this step (repeatable), e.g. to rerun a failed one")
    run.add_argument("--redo", action="store_true",
                     help="also the steps already measured on this device")
    prep = commands.add_parser("prepare", help="data/ for the next window, and its travel size")
    prep.add_argument("--budget", type=float, default=500)
    prep.add_argument("--tag", default="h200", help="the device whose results count (h200)")
    prep.add_argument("--source", default=str(ROOT.parent / "shared" / "data"))
    prep.add_argument("--redo", action="store_true")
    probe = commands.add_parser("environment")  # run by `run` in a process of its own
    probe.add_argument("--device", default="cuda")
    probe.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    if args.command == "environment":
        environment(args.device, args.json)
        return 0
    if args.command == "prepare":
        return prepare(args)
    if args.budget <= 0:
        parser.error("--budget must be > 0 seconds")
    if args.smoke:
        args.out = args.out or tempfile.mkdtemp(prefix="amdim-gpu-check-smoke-")
    elif args.out is None:
        parser.error("--out is required (on the GPU machine: --out $OUT/c)")
    else:
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA device here: run with --smoke on a CPU")
    return Check(args).run()


if __name__ == "__main__":
    sys.exit(main())
