"""benchmarks/gpu_check.py on the CPU: the deadline, a kill midway, the plan of the next window."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def results_of(out: Path) -> dict:
    found = list(out.glob("smoke-gpu-check-*.json"))
    return json.loads(found[0].read_text()) if found else {}


def start(out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), "run", "--smoke", "--out", str(out),
                             "--scratch", str(out.parent / "scratch"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def test_a_kill_midway_keeps_every_finished_step(tmp_path):
    out = tmp_path / "out"
    process = start(out, "--only", "step-cifar-small", "--only", "cifar-run")
    try:
        deadline = time.monotonic() + 120
        while "step-cifar-small" not in results_of(out).get("steps", {}):
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "the first step never finished"
            time.sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # as the device tool's limit does
        process.wait()
    record = results_of(out)
    assert record["finished"] is False
    assert record["steps"]["environment"]["status"] == "ok"
    step = record["steps"]["step-cifar-small"]
    assert step["status"] == "ok" and step["results"]["end_to_end_images_per_s"] > 0
    assert "cifar-run" not in record["steps"]  # killed while it ran: not recorded as done
    # only the results and the log under --out: the run folders are scratch, elsewhere
    assert sorted(p.suffix for p in out.iterdir()) == [".json", ".log"]


def test_the_budget_bounds_the_command_and_names_what_did_not_fit(tmp_path):
    out = tmp_path / "out"
    begun = time.monotonic()
    process = start(out, "--budget", "12")
    printed, _ = process.communicate(timeout=120)
    assert process.returncode == 0, printed
    assert time.monotonic() - begun < 12 + 15  # the last command may overrun by its start-up
    record = results_of(out)
    assert record["finished"] is True
    skipped = {k: v["why"] for k, v in record["steps"].items() if v["status"] == "skipped"}
    assert "cifar-run" in skipped and "needs 300" in skipped["cifar-run"]
    assert "cifar-run" in printed  # said as it happened, not only in the JSON


def test_exit_75_is_a_clean_stop_and_a_timeout_is_not_a_failure():
    assert gpu_check._status({"pretrain": {"command": "x", "status": 75}}) == "ok"
    assert gpu_check._status({"a": {"command": "x", "status": 0},
                              "b": {"command": "y", "status": "timeout"}}) == "timeout"
    assert gpu_check._status({"a": {"command": "x", "status": 1}, "results": None}) == "failed"
    assert gpu_check._status({"b": {"status": "skipped", "why": "cpu"}}) == "skipped"


@pytest.mark.parametrize("name, tag", [("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100"),
                                       ("NVIDIA A100-SXM4-80GB", "a100"), ("Some GPU", "gpu")])
def test_results_are_tagged_by_the_device_and_mfu_uses_its_peak(name, tag):
    from amdim.training.benchmark import peak_flops_for

    assert gpu_check.device_tag(name) == tag
    assert peak_flops_for("NVIDIA H200") == peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for("NVIDIA H100 PCIe") == 756e12 and peak_flops_for("cpu") is None


def test_a_later_window_runs_what_is_still_missing(tmp_path):
    earlier = {"steps": {"environment": {"status": "ok"}, "gpu-tests": {"status": "ok"},
                         "step-cifar-small": {"status": "ok"}, "cifar-run": {"status": "ok"},
                         "step-cifar-paper": {"status": "failed"}}}
    (tmp_path / "h200-gpu-check-20270101-000000.json").write_text(json.dumps(earlier))
    done = gpu_check.measured("h200", tmp_path)
    assert set(done) == {"environment", "gpu-tests", "step-cifar-small", "cifar-run"}
    assert gpu_check.measured("h100", tmp_path) == {}  # another device measured nothing
    chosen, later = gpu_check.plan(done, budget=500)
    keys = [step.key for step in chosen]
    assert keys[0] == "step-cifar-paper"  # failed before: tried again, first
    assert "cifar-run" not in keys and "gpu-tests" not in keys
    assert sum(step.expect_s for step in chosen) <= 500 and later


def test_what_travels_stays_under_the_limit():
    if not gpu_check._shared_size(gpu_check.IMAGENETTE[0]):
        pytest.skip("../shared/data is not here")
    chosen, later = gpu_check.plan({}, budget=10_000)  # every step: more data than may travel
    files = {name for step in chosen for name in step.data}
    size = gpu_check._repo_size() + sum(gpu_check._shared_size(name) for name in files)
    assert size <= gpu_check.TRAVEL_LIMIT
    assert [step.key for step in later] == ["mixture-imagenette"]  # CIFAR-10 + Imagenette


def test_a_command_gets_at_most_the_time_it_is_given(tmp_path):
    args = argparse.Namespace(
        smoke=True, budget=60, out=str(tmp_path / "out"), scratch=str(tmp_path / "scratch"),
        data=str(tmp_path), redo=False, only=None)
    check = gpu_check.Check(args)
    check.log = open(tmp_path / "log", "w+")
    begun = time.monotonic()
    result = check.command([sys.executable, "-c", "import time; print('started', flush=True); "
                                                  "time.sleep(60)"], timeout=2)
    assert result["status"] == "timeout" and time.monotonic() - begun < 10
    assert "started" in result["output_tail"]  # what it printed before the stop is kept


def test_the_targets_are_read_from_the_steps():
    steps = {"gpu-tests": {"status": "ok"},
             "compiled-cifar-small": {"results": {"end_to_end_images_per_s": 20000.0}},
             "cifar-run": {"evaluation": {"linear_top1": 0.81}}}
    targets = gpu_check.reached(steps)
    assert targets["no host sync between log points (the gpu tests pass)"]["met"] is True
    small = targets["cifar-small end to end, bf16 compiled, images/s"]
    assert small["reached"] == 20000.0 and small["met"] is False  # reported, whatever it is
    assert targets["imagenet-small step, bf16 compiled, images/s"]["met"] is None
    assert [t["met"] for t in targets.values()].count(True) == 2
