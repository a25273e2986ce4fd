"""Two CPU processes (gloo) must train exactly like one process on the concatenated batch."""
import json
import os
import socket
import subprocess
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from amdim import checkpoint, distributed
from amdim.config import preset
from amdim.model import AMDIM

CFG = preset("digits", ndf=8, n_rkhs=64, n_depth=1, lr=1e-3)
BATCH = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def close(a, b):
    """Equal up to float32 summation order: relative to the tensor's norm."""
    return bool((a - b).norm() <= 1e-4 * b.norm() + 1e-5)


def fixed_batch():
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(2, BATCH, 3, 32, 32, generator=g)
    labels = torch.randint(0, 10, (BATCH,), generator=g)
    locations = tuple(torch.randint(0, 25, (BATCH,), generator=g) for _ in range(2))
    return x1, x2, labels, locations


def build():
    torch.manual_seed(0)
    model = AMDIM(CFG, n_classes=10)
    for module in model.modules():  # dropout masks cannot match across process counts
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def one_step(model, step_model, x1, x2, labels, locations):
    # SGD: Adam's first step is lr * sign(grad), which turns float noise in gradients that are
    # zero in exact arithmetic (a bias before batch norm) into full-size differences
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    out = step_model(x1, x2, labels, locations)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    return out["loss"].detach(), grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def worker(rank, world_size, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    distributed.setup("cpu")
    model = distributed.synchronise_batchnorm(build(), torch.device("cpu"))
    model.gather = distributed.gather
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    x1, x2, labels, locations = fixed_batch()
    part = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
    result = one_step(model, ddp, x1[part], x2[part], labels[part], tuple(l[part] for l in locations))
    state = {k: v for k, v in model.state_dict().items() if "running" in k}
    torch.save((result, state), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_processes_equal_one_process(tmp_path):
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    model = build()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss, grads, params = one_step(model, model, *fixed_batch())
    running = {k: v for k, v in model.state_dict().items() if "running" in k}
    for rank in range(2):
        (d_loss, d_grads, d_params), d_running = torch.load(tmp_path / f"rank{rank}.pt")
        # the NCE and its negatives span the global batch; the probe loss is averaged by DDP
        assert set(d_grads) == set(grads)
        for name in grads:
            assert close(d_grads[name], grads[name]), name
        for name in params:
            assert close(d_params[name] - initial[name], params[name] - initial[name]), name
        for name in running:  # batch statistics were taken over the global batch
            torch.testing.assert_close(d_running[name], running[name], rtol=1e-4, atol=1e-6, msg=name)
    # rank 0's loss: NCE over the whole batch + its own half's probe loss; the mean of the two
    # ranks' losses is the single-process loss
    losses = [torch.load(tmp_path / f"rank{r}.pt")[0][0] for r in range(2)]
    torch.testing.assert_close(sum(losses) / 2, loss, rtol=1e-5, atol=1e-6)


def torchrun(run_dir, epochs):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(free_port()), "-m", "amdim", "pretrain", "--ndf", "8",
               "--n-rkhs", "64", "--n-depth", "1", "--batch-size", "16", "--steps-per-epoch",
               "2", "--epochs", str(epochs), "--workers", "0", "--no-final-probe", "--device",
               "cpu", "--run-dir", str(run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_torchrun_trains_and_resumes(tmp_path):
    torchrun(tmp_path, epochs=1)
    assert checkpoint.load(tmp_path / "checkpoint.pt")["step"] == 2
    done = torchrun(tmp_path, epochs=2)  # every rank restores the checkpoint and goes on
    state = checkpoint.load(tmp_path / "checkpoint.pt")
    assert state["epoch"] == 2 and state["step"] == 4 and len(state["rng"]) == 2
    assert "resuming" in done.stderr
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]  # rank 0 alone writes
