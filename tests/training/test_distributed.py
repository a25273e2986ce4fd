"""Two CPU processes (gloo) must train exactly like one process on the concatenated batch."""
import itertools
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from amdim.config import preset
from amdim.model.amdim import AMDIM
from amdim.model.classifiers import clipped_cross_entropy
from amdim.training import checkpoint, distributed

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
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {k: v.detach() for k, v in out.items()}, grads, params


def per_rank_probes(x1, x2, labels, world_size=2):
    """The probes' gradients and mean loss under DDP: each rank's probes (their batch norm
    included) see only its own images, and DDP averages the ranks' gradients."""
    model = build()
    grads, mean_loss = {}, 0
    with torch.no_grad():  # the probes read detached features; the encoder is in train mode
        r1_x1, r1_x2 = model.encoder(x1).r1, model.encoder(x2).r1
    for part in torch.arange(BATCH).chunk(world_size):
        logits_mlp, logits_linear = model.probes(torch.cat([r1_x1[part], r1_x2[part]]))
        both = torch.cat([labels[part], labels[part]])
        loss = clipped_cross_entropy(logits_mlp, both) + clipped_cross_entropy(logits_linear, both)
        for name, grad in zip(
                [n for n, _ in model.probes.named_parameters()],
                torch.autograd.grad(loss, list(model.probes.parameters()))):
            grads["probes." + name] = grads.get("probes." + name, 0) + grad / world_size
        mean_loss = mean_loss + loss.detach() / world_size
    return grads, mean_loss


def distributed_model(channels_last: bool):
    """The model as train.py distributes it: global batch norm in the encoder, gathered NCE."""
    model = build()
    model.encoder = distributed.synchronise_batchnorm(model.encoder)
    model.gather = distributed.gather
    if channels_last:  # as on CUDA: r5 and r7 come out channels-last
        model.to(memory_format=torch.channels_last)
    return model, torch.nn.parallel.DistributedDataParallel(model)


def worker(rank, world_size, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    assert distributed.setup(torch.device("cpu")) == (rank, world_size, torch.device("cpu"))
    x1, x2, labels, locations = fixed_batch()
    part = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
    for channels_last in (False, True):
        model, ddp = distributed_model(channels_last)
        views = [x[part] for x in (x1, x2)]
        if channels_last:
            views = [x.contiguous(memory_format=torch.channels_last) for x in views]
        result = one_step(model, ddp, *views, labels[part], tuple(l[part] for l in locations))
        state = {k: v for k, v in model.state_dict().items() if "running" in k}
        torch.save((result, state), os.path.join(out_dir, f"rank{rank}_{channels_last}.pt"))
        r5 = model.eval().encoder(views[0]).r5  # (eval: no statistics update, no collective)
        assert r5.is_contiguous(memory_format=torch.channels_last) == channels_last
    model, ddp = distributed_model(channels_last=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # global batch norm of bf16 activations
        bf16 = ddp(x1[part], x2[part], labels[part], tuple(l[part] for l in locations))
    bf16["loss"].backward()
    torch.save(bf16["loss"].detach(), os.path.join(out_dir, f"rank{rank}_bf16.pt"))
    dist.destroy_process_group()


def test_two_processes_equal_one_process(tmp_path):
    """Also with channels-last features, and with per-rank probes."""
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    model = build()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    out, grads, params = one_step(model, model, *fixed_batch())
    running = {k: v for k, v in model.state_dict().items()
               if "running" in k and not k.startswith("probes.")}
    x1, x2, labels, _ = fixed_batch()
    probe_grads, probe_loss = per_rank_probes(x1, x2, labels)
    for rank, channels_last in itertools.product(range(2), (False, True)):
        (_, d_grads, d_params), d_running = torch.load(tmp_path / f"rank{rank}_{channels_last}.pt")
        # the NCE and its negatives span the global batch; the probe loss is averaged by DDP
        assert set(d_grads) == set(grads)
        for name in grads:
            expected = probe_grads[name] if name.startswith("probes.") else grads[name]
            assert close(d_grads[name], expected), (channels_last, name)
        for name in params:
            if not name.startswith("probes."):  # (the probes' step is checked by their grads)
                assert close(d_params[name] - initial[name], params[name] - initial[name]), name
        for name in running:  # batch statistics were taken over the global batch
            torch.testing.assert_close(d_running[name], running[name], rtol=1e-4, atol=1e-6, msg=name)
    # rank 0's loss: NCE over the whole batch + its own half's probe loss; the mean of the two
    # ranks' losses is the single-process NCE + the mean of the per-rank probe losses
    losses = [torch.load(tmp_path / f"rank{r}_False.pt")[0][0]["loss"] for r in range(2)]
    expected = out["loss"] - out["probe_loss"] + probe_loss
    torch.testing.assert_close(sum(losses) / 2, expected, rtol=1e-5, atol=1e-6)
    for rank in range(2):  # the same step under bf16 autocast
        torch.testing.assert_close(torch.load(tmp_path / f"rank{rank}_bf16.pt"), losses[rank],
                                   rtol=2e-3, atol=0)


# ops that make the host wait for the device (a boolean mask index runs a nonzero)
HOST_SYNCS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.is_nonzero"}


class RecordOps(TorchDispatchMode):
    """Names of the ATen ops run under it; a boolean-mask index is recorded as aten.nonzero."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name == "aten.index" and any(i is not None and i.dtype == torch.bool for i in args[1]):
            name = "aten.nonzero"
        self.ops.append(name)
        return func(*args, **(kwargs or {}))


def compile_worker(rank, world_size, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    distributed.setup(torch.device("cpu"))
    model, ddp = distributed_model(channels_last=False)
    x1, x2, labels, locations = fixed_batch()
    part = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
    inputs = (x1[part], x2[part], labels[part], tuple(l[part] for l in locations))
    with RecordOps() as forward:
        loss = model(*inputs)["loss"]
    with RecordOps() as backward:
        loss.backward()
    explanation = torch._dynamo.explain(ddp)(*inputs)
    reasons = [str(reason) for reason in explanation.break_reasons]
    torch.save((explanation.graph_break_count, reasons, forward.ops, backward.ops),
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_model_compiles_whole_and_never_syncs(tmp_path):
    """The gathers and the batch norms' all-reduces trace into one compiled graph (no graph
    break), no op waits for the device, and the gathers' backward needs no collective."""
    mp.spawn(compile_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        count, reasons, forward, backward = torch.load(tmp_path / f"rank{rank}.pt")
        assert count == 0, reasons
        assert not HOST_SYNCS & {*forward, *backward}
        # 3 maps x 2 views + 2 location vectors gathered; each batch norm sums twice
        assert forward.count("_c10d_functional.all_gather_into_tensor") == 8
        n_reductions = forward.count("_c10d_functional.all_reduce")
        assert n_reductions > 0 and backward.count("_c10d_functional.all_reduce") == n_reductions
        assert not {op for op in backward if "gather" in op or "scatter" in op}


def torchrun(run_dir, epochs, *extra):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(free_port()), "-m", "amdim", "pretrain", "--ndf", "8",
               "--n-rkhs", "64", "--n-depth", "1", "--batch-size", "16", "--steps-per-epoch",
               "2", "--epochs", str(epochs), "--workers", "0", "--no-final-probe", "--device",
               "cpu", "--run-dir", str(run_dir), *extra]
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


def test_sharded_data_trains_on_each_rank_and_resumes_exactly(tmp_path):
    """--data-path sharded: each of the 2 ranks caches half the images; a run stopped after
    an epoch and resumed ends with the weights of the run never stopped."""
    torchrun(tmp_path / "straight", 2, "--data-path", "sharded")
    torchrun(tmp_path / "resumed", 1, "--data-path", "sharded")
    torchrun(tmp_path / "resumed", 2, "--data-path", "sharded")
    a, b = (checkpoint.load(tmp_path / run / "checkpoint.pt") for run in ("straight", "resumed"))
    assert a["data_path"] == b["data_path"] == "sharded" and a["step"] == b["step"] == 4
    assert all(torch.equal(a["encoder"][k], b["encoder"][k]) for k in a["encoder"])


def test_only_plain_batch_norms_are_synchronised():
    """A batch-norm subclass that does more (timm's BatchNormAct2d) is kept, not flattened."""
    class NormAct(torch.nn.BatchNorm2d):
        def forward(self, x):
            return torch.relu(super().forward(x))

    module = torch.nn.Sequential(torch.nn.BatchNorm2d(4), NormAct(4))
    distributed.synchronise_batchnorm(module)
    assert isinstance(module[0], distributed.AllReduceBatchNorm) and type(module[1]) is NormAct
