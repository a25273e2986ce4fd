"""Where and how a run computes: its device, the cores it may use, its precision, and where
a command may write (never over its input or a run's files). The caller's business (the
commands and the tests), never the model's: the library takes a device and an autocast
factory from here."""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch

from .config import PretrainConfig

log = logging.getLogger("amdim")
# the files `amdim pretrain` keeps in a run folder (training.run_folder, checkpoint): no other
# command writes a file of these names into a folder that holds a run
CHECKPOINT = "checkpoint.pt"
LOCK = "lock"  # held (flock) by the run writing into the folder; names its PID and host
RUN_FILES = (CHECKPOINT, CHECKPOINT + ".tmp", "config.json", "metrics.jsonl", LOCK)
EVENTS_PREFIX = "events.out.tfevents."  # TensorBoard's


def check_output(out: str | os.PathLike, inputs=(), flag: str = "--out") -> Path:
    """`out` as a Path, after refusing (ValueError) an output that would write over one of the
    command's `inputs` (files it reads: a checkpoint, features) or over a file of a pretraining
    run folder (RUN_FILES, TensorBoard events): the one check of every command that writes."""
    out = Path(out)
    for given in inputs:
        if given is not None and _same_file(out, Path(given)):
            raise ValueError(f"{flag} {out} is this command's input {given}; writing there "
                             f"would destroy it: pass {flag} another file")
    if out.name in RUN_FILES or out.name.startswith(EVENTS_PREFIX):
        folder = out.parent
        if any((folder / name).exists() for name in RUN_FILES) or any(
                folder.glob(EVENTS_PREFIX + "*")):
            raise ValueError(f"{flag} {out} is the {out.name} of the run folder {folder}; "
                             f"writing there would destroy the run: pass {flag} another file")
    return out


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.expanduser().resolve() == b.expanduser().resolve()


def file_tag(text: str) -> str:
    """A --data value or a view's name as part of a file name: its last path component
    (.npz: the dataset's name), letters, digits, '.', '_' and '-' only."""
    name = Path(text).name
    if name.lower().endswith(".npz"):
        name = name[:-4]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "data"


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. under taskset or a container's
    cpuset), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast runs natively on device: Ampere or newer GPUs; CPUs with
    AVX512-BF16 or AMX (elsewhere CPU bf16 is emulated and slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_runtime(cfg: PretrainConfig, device: torch.device, data_path: str,
                    processes_here: int = 1) -> PretrainConfig:
    """cfg with its automatic runtime settings made concrete for this machine (the values
    config.json records): precision, loader workers and compute threads. The cores of this
    machine are shared by its `processes_here` processes; compute threads plus loader workers
    never exceed them (more threads than cores spin against each other: 10x slower, measured)."""
    cores = max(1, available_cores() // processes_here)
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if native_bf16(device) else "fp32"
    workers = cfg.workers
    if workers < 0:  # the device paths build views in the main process
        limit = 8 if device.type == "cuda" else 1  # on a CPU every worker takes a compute core
        # decode: the workers only read bytes, which on a CPU this process does in passing
        none = data_path in ("device", "sharded") or (data_path == "decode"
                                                       and device.type != "cuda")
        workers = 0 if none else min(limit, cores - 1)
    threads = cfg.threads or max(1, cores - (workers if device.type == "cpu" else 0))
    if threads > cores:  # threads beyond the cores spin against each other: 10-800x slower
        log.warning("--threads %d is more than the %d cores this process may use "
                    "(os.sched_getaffinity%s); using %d", threads, cores,
                    f", shared by {processes_here} processes" if processes_here > 1 else "",
                    cores)
        threads = cores
    return dataclasses.replace(cfg, precision=precision, workers=workers, threads=threads)


def resolve_device(name: str) -> torch.device:
    """auto -> cuda if available, else cpu; any other torch device name as is."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        hint = " (a GPU is cuda)" if name.lower().startswith("gpu") else ""
        raise ValueError(f"--device {name!r} is not a device{hint}; use auto, cpu, cuda or "
                         "cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


def autocast_for(precision: str, device: torch.device) -> Callable:
    """A factory of the autocast context of `precision` (a no-op for fp32)."""
    if precision == "fp32":
        return nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)
