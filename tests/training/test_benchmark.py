"""`amdim benchmark` on CPU with the tiny digits preset: every field present and sane."""
import argparse
import json

import pytest

from amdim.training import benchmark
from tests.data.test_device_images import write_npz


def run(argv):
    parser = argparse.ArgumentParser()
    benchmark.register(parser.add_subparsers())
    args = parser.parse_args(["benchmark", *argv])
    return args.func(args)


def test_benchmark_digits_on_cpu(tmp_path, capsys):
    data = write_npz(tmp_path / "tiny.npz", [(32, 32)] * 20)
    out = tmp_path / "results" / "cpu.json"
    results = run(["--preset", "digits", "--batch-size", "8", "--steps", "2", "--warmup", "1",
                   "--device", "cpu", "--no-compile", "--data", str(data), "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(capsys.readouterr().out) == results
    assert results["preset"] == "digits" and results["batch_size"] == 8
    assert results["train_images_per_s"] > 0 and results["end_to_end_images_per_s"] > 0
    assert results["augment_images_per_s"] > 0 and results["n_images"] == 20
    # digits encoder: a few hundred MFLOP per image (both views, forward + backward)
    assert 1e8 < results["flop_per_image"] < 1e9
    assert results["mfu"] is None and results["peak_memory_bytes"] is None  # CPU
    assert results["config"]["ndf"] == 32 and results["compile"] is False


def test_benchmark_mfu_with_a_given_peak():
    results = run(["--preset", "digits", "--batch-size", "4", "--steps", "1", "--warmup", "0",
                   "--device", "cpu", "--no-compile", "--precision", "bf16",
                   "--channels-last", "--peak-flops", "1e12"])
    assert results["mfu"] == pytest.approx(results["achieved_flop_per_s"] / 1e12)
    assert results["precision"] == "bf16" and results["end_to_end_images_per_s"] is None
