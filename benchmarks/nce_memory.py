"""Peak memory and time of amdim.multiscale_nce (forward + backward) on synthetic features.

Issue 2 asks that the B=480, n_rkhs=2048 case fit comfortably on one GPU. On CUDA this reports
torch.cuda.max_memory_allocated above the features themselves; elsewhere it runs the same
computation and reports the growth of the process's peak resident memory instead (coarser:
it includes allocator slack).

    python benchmarks/nce_memory.py --batch-size 480 --n-rkhs 2048 --out benchmarks/results/h100-nce-memory.json
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from amdim import Features, multiscale_nce


def measure(batch_size: int, n_rkhs: int, device: torch.device, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    features = [Features(*(torch.randn(batch_size, n_rkhs, s, s, device=device, dtype=dtype,
                                       requires_grad=True) for s in (1, 5, 7)))
                for _ in range(2)]
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    rss_base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    start = time.perf_counter()
    losses = multiscale_nce(*features)
    sum(losses.values()).backward()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    feature_bytes = sum(t.numel() * t.element_size() for f in features for t in f)
    return {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "batch_size": batch_size, "n_rkhs": n_rkhs, "dtype": str(dtype).removeprefix("torch."),
        "feature_bytes": feature_bytes,
        "peak_bytes_above_features": torch.cuda.max_memory_allocated(device) - base if cuda else None,
        "cpu_peak_rss_growth_bytes": None if cuda else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_base,
        "forward_backward_s": seconds,
        "losses": {k: v.item() for k, v in losses.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=480)
    parser.add_argument("--n-rkhs", type=int, default=2048)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out")
    args = parser.parse_args()
    result = measure(args.batch_size, args.n_rkhs, torch.device(args.device),
                     getattr(torch, args.dtype))
    result["command"] = "python benchmarks/nce_memory.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
