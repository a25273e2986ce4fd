"""`amdim benchmark`: how fast pretraining runs on this machine, as one JSON object.

Measures, for a preset (any field overridable by the flags below):
- the training step alone on synthetic inputs, as `amdim pretrain` takes it (model.AMDIM:
  encoder forward on each view, multiscale NCE, online probes; backward; Adam step, fused on
  CUDA);
- with --data, the data path alone (finished view pairs per second as the training loop
  receives them; per loader worker on the loader path) and the same step fed by it end to
  end, on the path amdim pretrain takes (device: decoded once onto the device, views built
  there; decode: each batch's JPEG bytes decoded on the device; loader: PIL workers), with
  its workers and compute threads;
- peak device memory, FLOP per image (FlopCounterMode on one forward + backward, divided by
  the batch size) and MFU = achieved FLOP/s / peak FLOP/s.
An "image" is one source image, i.e. two views. benchmarks/README.md explains every field.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..config import PRESETS, PretrainConfig, finite_float, preset
from ..data.batches import TrainBatches
from ..data.datasets import resolved_data
from ..data.image_files import DataError
from ..model.amdim import AMDIM
from ..runtime import check_output, native_bf16, resolve_device, resolve_runtime
from .inputs import build_datasets, choose_data_path, make_batches
from .step import TrainingStep, configure_device

# bf16 dense tensor-core peaks (FLOP/s, no sparsity) from the vendor's data sheets, by a part
# of the device's name, most specific first: the default peak for MFU on that device
BF16_DENSE_PEAKS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
                    ("H200", 989e12), ("GH200", 989e12), ("B200", 2250e12), ("A100", 312e12))
N_CLASSES = 10  # outputs of the online probes timed with the step (their cost is tiny)
log = logging.getLogger(__name__)


def peak_flops_for(device_name: str) -> float | None:
    """The bf16 dense peak of a device from its name, or None for a device not listed."""
    return next((peak for part, peak in BF16_DENSE_PEAKS if part in device_name), None)


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_step(cfg: PretrainConfig, device: torch.device, compile: bool) -> TrainingStep:
    """The training step `amdim pretrain` runs (step.TrainingStep), on a fresh model with
    online probes of N_CLASSES outputs."""
    model = AMDIM(cfg, N_CLASSES).to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    return TrainingStep(cfg, model, device, torch.compile(model) if compile else None)


def _flop_per_step(step: TrainingStep, view1: torch.Tensor, view2: torch.Tensor,
                   labels: torch.Tensor) -> int:
    """FLOP of one forward + backward (matmuls and convolutions), counted eagerly."""
    with FlopCounterMode(display=False) as counter:
        step.forward_backward(view1, view2, labels, step.model)
    step.optimiser.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def _timed(step: Callable[[], object], steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per call of step(), after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    _synchronise(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _synchronise(device)
    return (time.perf_counter() - start) / steps


def _endless(batches: TrainBatches):
    while True:  # epoch after epoch
        yield from batches


def benchmark(cfg: PretrainConfig, device: torch.device, steps: int = 20, warmup: int = 5,
              compile: bool = False, data: str | None = None, peak_flops: float | None = None
              ) -> dict:
    """Measure pretraining speed for cfg (precision and memory format as it says) on device;
    returns the JSON-ready results."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got {steps}, {warmup}")
    torch.manual_seed(cfg.seed)
    configure_device(device)  # TF32 and autotuned convolutions, as pretraining runs
    batch, size = cfg.batch_size, cfg.image_size
    step = _model_step(cfg, device, compile)
    inputs = [torch.randn(batch, 3, size, size, device=device) for _ in range(2)]
    inputs.append(torch.randint(0, N_CLASSES, (batch,), device=device))
    flop_per_image = _flop_per_step(step, *inputs) / batch
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    log.info("timing %d training steps (after %d warm-up steps) on %s", steps, warmup, device)
    start = time.perf_counter()  # the first step alone: with compile, mostly compilation
    step(*inputs, cfg.lr)
    _synchronise(device)
    first_step_s = time.perf_counter() - start
    step_s = _timed(lambda: step(*inputs, cfg.lr), steps, max(warmup - 1, 0), device)
    results = {
        "preset": None, "device": _device_name(device), "torch": torch.__version__,
        "backbone": cfg.backbone, "encoder_parameters": sum(  # trained ones only
            p.numel() for p in step.model.encoder.parameters() if p.requires_grad),
        "batch_size": batch, "image_size": size, "precision": cfg.precision,
        "compile": compile, "channels_last": cfg.channels_last, "steps": steps, "warmup": warmup,
        "first_step_s": first_step_s,
        "train_step_ms": 1e3 * step_s, "train_images_per_s": batch / step_s,
        "flop_per_image": flop_per_image, "achieved_flop_per_s": flop_per_image * batch / step_s,
        "peak_flop_per_s": peak_flops, "mfu": None,
        "data": data, "data_path": None, "loader_workers": None, "end_to_end_threads": None,
        "n_images": None, "decode_s": None, "cache_bytes": None,
        "augment_images_per_s": None, "per_worker_images_per_s": None, "end_to_end_step_ms": None,
        "end_to_end_images_per_s": None, "mfu_end_to_end": None,
        "peak_memory_bytes": None,
    }
    if peak_flops:
        results["mfu"] = results["achieved_flop_per_s"] / peak_flops
    if data is not None:
        results.update(_end_to_end(cfg, step, device, data, steps, warmup))
        if peak_flops:
            results["mfu_end_to_end"] = (flop_per_image * results["end_to_end_images_per_s"]
                                         / peak_flops)
    if device.type == "cuda":
        results["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    results["config"] = json.loads(json.dumps(cfg.to_dict()))  # tuples as JSON lists
    return results


def _end_to_end(cfg: PretrainConfig, step: TrainingStep, device: torch.device, data: str,
                steps: int, warmup: int) -> dict:
    """The data path alone (batches of finished view pairs as the training loop receives them)
    and the step fed by it, on the path `amdim pretrain` takes for `data` (cfg.data_path,
    auto resolved), with its loader workers and compute threads."""
    cfg = replace(cfg, data=resolved_data(data))
    train_set = build_datasets(cfg)[0]
    path = choose_data_path(cfg, train_set, device)
    # the workers and threads pretraining would use on this path (resolve_runtime)
    run = resolve_runtime(replace(cfg, data_path=path, threads=0, workers=-1), device, path)
    start = time.perf_counter()
    batches, _ = make_batches(run, path, train_set, None, device, 0, 1)
    _synchronise(device)
    setup_s = time.perf_counter() - start
    cache = getattr(batches, "cache", None)
    log.info("%s: %d images on the %s data path (%d loader workers, %d compute threads), set "
             "up in %.1f s", data, len(train_set), path, run.workers, run.threads, setup_s)
    if cache is not None and min(cache.images.shape[2:]) < cfg.image_size:
        log.warning("%s holds %dx%d px images, smaller than the preset's %d px: views will be "
                    "upscaled", data, cache.images.shape[3], cache.images.shape[2],
                    cfg.image_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(run.threads)
    try:
        stream = _endless(batches)
        data_s = _timed(lambda: next(stream), steps, warmup, device)

        def end_to_end_step():
            (view1, view2), labels = next(stream)
            step(view1, view2, labels.clamp(max=N_CLASSES - 1), cfg.lr)  # probes: N_CLASSES

        step_s = _timed(end_to_end_step, steps, warmup, device)
    finally:
        torch.set_num_threads(threads)
    return {"data_path": path, "loader_workers": run.workers, "end_to_end_threads": run.threads,
            "n_images": len(train_set), "decode_s": setup_s,
            "cache_bytes": cache.nbytes if cache is not None else None,
            "augment_images_per_s": cfg.batch_size / data_s,
            "per_worker_images_per_s": (cfg.batch_size / data_s / run.workers
                                        if run.workers else None),
            "end_to_end_step_ms": 1e3 * step_s,
            "end_to_end_images_per_s": cfg.batch_size / step_s}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()}, " \
           f"{torch.get_num_threads()} threads)"


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    overrides = {"seed": args.seed, "device": str(device)}
    for name in ("batch_size", "precision", "channels_last", "threads", "n_rkhs", "ndf",
                 "n_depth", "backbone", "image_size", "data_path", "augment"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    # what `amdim pretrain` would run here: its precision, memory format and threads
    cfg = resolve_runtime(preset(args.preset, **overrides), device, "device")
    torch.set_num_threads(cfg.threads)
    compile = device.type == "cuda" if args.compile is None else args.compile
    peak = args.peak_flops
    if peak is None and device.type == "cuda":
        peak = peak_flops_for(_device_name(device))
        if peak is None:
            log.warning("no known bf16 peak for %s: give --peak-flops for MFU",
                        _device_name(device))
    if not args.compare:
        results = {**benchmark(cfg, device, args.steps, args.warmup, compile, args.data, peak),
                   "preset": args.preset}
    else:
        results = {"preset": args.preset, "modes": compare_modes(
            cfg, device, args.steps, args.warmup, compile, args.data, peak)}
    results["command"] = "amdim benchmark " + " ".join(sys.argv[2:])
    text = json.dumps(results, indent=2)
    print(text)  # first: the measurement is not lost if --out cannot be written
    if args.out:
        try:
            Path(args.out).write_text(text + "\n")
        except OSError as error:
            raise SystemExit(f"amdim benchmark: cannot write {args.out} "
                             f"({error.strerror or error}); the results are printed above: "
                             "free some space or pass another --out") from None
    return results


def _check_out(out: str) -> None:
    """Refuse an --out that cannot be written before measuring (its folder is created)."""
    path = Path(out)
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ValueError(f"--out {out}: {blocking} is a file, not a folder; pass a path in a "
                         "folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--out {out}: cannot create its folder {path.parent} "
                         f"({error.strerror or error}); pass a path in a writable folder") from None
    if path.is_dir():
        raise ValueError(f"--out {out} is a folder; pass a file name such as "
                         f"{path / 'benchmark.json'}")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"--out {out} cannot be written (no permission); pass another path")


def compare_modes(cfg: PretrainConfig, device: torch.device, steps: int, warmup: int,
                  compile: bool, data: str | None, peak: float | None) -> list[dict]:
    """benchmark() of each of fp32 / bf16 (where native) x NCHW / channels-last (x eager /
    compiled with compile), side by side in one process; each with its speed-up over the
    first, fp32 NCHW eager (the package's step before these options)."""
    precisions = ("fp32", "bf16") if native_bf16(device) else ("fp32",)
    modes = [(p, cl, c) for c in sorted({False, compile}) for p in precisions
             for cl in (False, True)]
    results = []
    for precision, channels_last, compiled in modes:
        mode = replace(cfg, precision=precision, channels_last=channels_last)
        results.append(benchmark(mode, device, steps, warmup, compiled, data, peak))
        for key in ("train_images_per_s", "end_to_end_images_per_s"):
            if results[-1][key] is not None:
                results[-1][f"{key}_speedup"] = results[-1][key] / results[0]["train_images_per_s"]
        log.info("%s %s %s: %.1f images/s", precision, "channels-last" if channels_last else
                 "NCHW", "compiled" if compiled else "eager", results[-1]["train_images_per_s"])
    return results


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "benchmark", help="measure pretraining throughput, memory, FLOP and MFU",
        description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="digits", choices=sorted(PRESETS),
                        help="configuration to measure (default: digits)")
    parser.add_argument("--batch-size", type=int, help="images per step (default: the preset's)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default: 20)")
    parser.add_argument("--warmup", type=int, default=5,
                        help="untimed steps first, for compilation and autotuning (default: 5)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"),
                        help="autocast precision (default: the preset's, auto as amdim pretrain)")
    parser.add_argument("--threads", type=int, help="compute threads (default: the usable cores)")
    parser.add_argument("--ndf", type=int, help="trunk width (default: the preset's)")
    parser.add_argument("--n-rkhs", type=int, help="embedding width (default: the preset's)")
    parser.add_argument("--n-depth", type=int, help="layers per block (default: the preset's)")
    parser.add_argument("--backbone", help="amdim, resnet18, resnet50, ... or timm:<model> "
                                           "(default: the preset's, amdim)")
    parser.add_argument("--image-size", type=int, choices=(32, 64, 128),
                        help="input side in px (default: the preset's)")
    parser.add_argument("--compare", action="store_true",
                        help="time fp32/bf16 x NCHW/channels-last (x eager/compiled with "
                             "--compile) side by side, with speed-ups over fp32 NCHW eager")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the encoder and the loss (default: on CUDA only)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="channels-last memory format for the model and its inputs "
                             "(default: on, as amdim pretrain)")
    parser.add_argument("--data", metavar="DATA",
                        help="also time the data path alone and end to end on this data (a "
                             ".npz file, an image folder, an amdim prepare store, a dataset "
                             "name), on the path amdim pretrain takes for it")
    parser.add_argument("--data-path", choices=("auto", "device", "sharded", "decode", "loader"),
                        help="the data path to time with --data (default: auto, as pretrain)")
    parser.add_argument("--augment", choices=("paper", "imagenet-faa", "randaugment",
                                              "trivialaugment"),
                        help="the views (default: the preset's)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda:N")
    parser.add_argument("--peak-flops", type=finite_float,
                        help="peak FLOP/s for MFU (default on CUDA: the bf16 dense peak of "
                             "the device's name, e.g. 989e12 for an H100 SXM or H200; no MFU "
                             "on CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", metavar="JSON", help="also write the results to this file")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> dict:
    """run() for the command line: impossible settings end in a message, not a traceback."""
    try:
        if args.steps < 1 or args.warmup < 0:
            raise ValueError(f"--steps must be >= 1 and --warmup >= 0 (got {args.steps}, "
                             f"{args.warmup})")
        if args.peak_flops is not None and args.peak_flops <= 0:
            raise ValueError(f"--peak-flops must be > 0 FLOP/s, got {args.peak_flops}")
        if args.out:
            check_output(args.out)  # never over a run's files
            _check_out(args.out)  # and writable, before measuring
        return run(args)
    except (ValueError, DataError) as error:
        raise SystemExit(f"amdim benchmark: {error}") from None
    except torch.OutOfMemoryError:
        batch = args.batch_size or f"of the preset {args.preset}"
        raise SystemExit(f"amdim benchmark: out of GPU memory with batch size {batch}: lower "
                         "--batch-size, or use a smaller model (--ndf, --n-rkhs, --n-depth)"
                         ) from None
    except (RuntimeError, MemoryError) as error:  # the CPU allocator raises a RuntimeError
        if not isinstance(error, MemoryError) and "can't allocate memory" not in str(error):
            raise
        raise SystemExit("amdim benchmark: out of CPU memory (RAM): lower --batch-size, or use "
                         "a smaller model (--ndf, --n-rkhs, --n-depth)") from None
