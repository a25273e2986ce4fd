"""torchrun beyond one process group's life: a rank killed mid-run under --max-restarts, and
two agents (--nnodes 2) on this machine. Both must end where an uninterrupted run on one
machine ends, bit for bit: resume is exact and the ranks compute the same either way."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from amdim.training import checkpoint
from tests.training.test_distributed import free_port
from tests.training.test_pretraining import TIMINGS

pytestmark = [pytest.mark.slow,  # about 20 s each: several torchrun starts
              pytest.mark.skipif(not Path("/proc/self/stat").exists(),
                                 reason="finds torchrun's workers through /proc")]
EPOCHS, STEPS = 3, 6
PRETRAIN = ["-m", "amdim", "pretrain", "--ndf", "8", "--n-rkhs", "64", "--n-depth", "1",
            "--batch-size", "16", "--steps-per-epoch", str(STEPS), "--epochs", str(EPOCHS),
            "--workers", "0", "--threads", "1", "--no-final-probe", "--device", "cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(run_dir, *options: str) -> subprocess.Popen:
    """One torchrun agent (c10d rendezvous on the loopback address) training into run_dir."""
    command = [sys.executable, "-m", "torch.distributed.run", "--rdzv-backend", "c10d",
               "--local-addr", "127.0.0.1", "--monitor-interval", "0.2", *options,
               *PRETRAIN, "--run-dir", str(run_dir)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=ENV, start_new_session=True)


def finish(agent: subprocess.Popen, timeout: float = 300) -> str:
    """The agent's output once it exits with 0; a hung agent is stopped (its workers with it)."""
    try:
        output, _ = agent.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(agent.pid, signal.SIGTERM)  # the agent stops its workers
        try:
            output, _ = agent.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(agent.pid, signal.SIGKILL)
            output, _ = agent.communicate()
        pytest.fail(f"torchrun ran over {timeout} s:\n{output[-3000:]}")
    assert agent.returncode == 0, output[-3000:]
    return output


def worker_of_rank(agent: subprocess.Popen, rank: int) -> int:
    """The PID of the agent's worker process with RANK=rank."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:  # the field after the parenthesised name: state, then the parent's PID
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != agent.pid:
                continue
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):  # a process that ended meanwhile
            continue
        if f"RANK={rank}".encode() in environ:
            return int(stat.parent.name)
    raise AssertionError(f"torchrun has no worker of rank {rank}")


def same_run(a: Path, b: Path) -> None:
    """Equal weights, optimiser state and metrics lines (but for timings)."""
    first, second = (checkpoint.load(run / "checkpoint.pt") for run in (a, b))
    assert first["epoch"] == second["epoch"] == EPOCHS
    assert first["step"] == second["step"] == EPOCHS * STEPS
    for part in ("encoder", "probes"):
        for key, value in first[part].items():
            assert torch.equal(value, second[part][key]), (part, key)
    torch.testing.assert_close(first["optimizer"]["state"], second["optimizer"]["state"],
                               rtol=0, atol=0)
    lines = [[{k: v for k, v in json.loads(line).items() if k not in TIMINGS}
              for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (a, b)]
    assert [line["epoch"] for line in lines[0]] == list(range(1, EPOCHS + 1))
    assert lines[0] == lines[1]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """2 processes on one machine, never stopped."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    finish(torchrun(run_dir, "--nproc-per-node", "2", "--rdzv-endpoint",
                    f"127.0.0.1:{free_port()}"))
    return run_dir


def wait_for_checkpoint(run_dir: Path, agents: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + 240
    while not (run_dir / "checkpoint.pt").exists():  # written whole (renamed into place)
        assert all(a.poll() is None for a in agents), "torchrun ended before a checkpoint"
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.02)


def test_killed_rank_is_restarted_from_the_checkpoint(tmp_path, uninterrupted):
    """kill -9 of rank 0 (the one holding the run folder's lock and writing it) after the
    first checkpoint: torchrun --max-restarts 1 starts every rank again, they resume from the
    checkpoint and end as the uninterrupted run."""
    agent = torchrun(tmp_path, "--nproc-per-node", "2", "--max-restarts", "1",
                     "--rdzv-endpoint", f"127.0.0.1:{free_port()}")
    wait_for_checkpoint(tmp_path, [agent])
    os.kill(worker_of_rank(agent, 0), signal.SIGKILL)
    output = finish(agent)
    assert "resuming" in output  # (a kill after the last epoch could not have shown this)
    same_run(uninterrupted, tmp_path)


def test_two_machines_train_as_one_and_survive_a_killed_rank(tmp_path, uninterrupted):
    """Two torchrun agents (--nnodes 2, one process each) meeting at a c10d rendezvous on
    127.0.0.1 train exactly as one agent of two processes, also when rank 1 is killed after
    the first checkpoint: only its agent counts a restart, the other follows it."""
    endpoint = ["--nnodes", "2", "--nproc-per-node", "1", "--max-restarts", "1",
                "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id",
                f"amdim-test-{os.getpid()}"]
    agents = [torchrun(tmp_path, *endpoint) for _ in range(2)]
    wait_for_checkpoint(tmp_path, agents)
    ranks = {}
    for agent in agents:
        try:
            ranks[agent.pid] = worker_of_rank(agent, 1)
        except AssertionError:  # rank 1 runs under the other agent
            continue
    assert len(ranks) == 1
    os.kill(*ranks.values(), signal.SIGKILL)
    outputs = [finish(agent) for agent in agents]
    assert sum("resuming" in output for output in outputs) == 1  # rank 0 alone logs
    same_run(uninterrupted, tmp_path)
