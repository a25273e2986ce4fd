"""Where and how a run computes: its device, the cores it may use, its precision. The
caller's business (the commands and the tests), never the model's: the library takes a device
and an autocast factory from here."""
from __future__ import annotations

import dataclasses
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch

from .config import PretrainConfig


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
    if workers < 0:  # the device path builds views in the main process
        limit = 8 if device.type == "cuda" else 1  # on a CPU every worker takes a compute core
        workers = 0 if data_path == "device" else min(limit, cores - 1)
    threads = cfg.threads or max(1, cores - (workers if device.type == "cpu" else 0))
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
