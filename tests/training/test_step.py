"""The training step shared by pretrain and benchmark: no host sync, on-device skipping."""
from collections import Counter

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from amdim.config import preset
from amdim.model.amdim import AMDIM
from amdim.training.step import SUMS, EpochSums, TrainingStep

CPU = torch.device("cpu")


class HostReads(TorchDispatchMode):
    """Counts the ATen ops that make the host wait for the device: reading a scalar
    (.item(), bool(), float()) and copies to the CPU. .tolist() and .numpy() skip the
    dispatcher, so they are counted by patching them."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.reads = Counter()
        for name in ("tolist", "numpy"):
            real = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counted(name, real))

    def _counted(self, name, real):
        def counted(tensor, *args, **kwargs):
            self.reads[name] += 1
            return real(tensor, *args, **kwargs)
        return counted

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense":
            self.reads[name] += 1
        if name in ("_to_copy", "copy_") and kwargs.get("device") not in (None, args[0].device):
            self.reads["copy to another device"] += 1
        return func(*args, **kwargs)


def tiny_step(precision="bf16", skip_nonfinite=False):
    cfg = preset("digits", ndf=8, n_rkhs=64, n_depth=1, batch_size=8, precision=precision,
                 skip_nonfinite=skip_nonfinite)
    torch.manual_seed(0)
    model = AMDIM(cfg, 10)
    return TrainingStep(cfg, model, CPU), torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))


def test_steps_between_log_points_make_no_host_sync(monkeypatch):
    step, x, labels = tiny_step()
    sums = EpochSums(CPU)
    sums.add(step(x, x, labels, 1e-3))  # the first step creates Adam's state
    with HostReads(monkeypatch) as mode:
        for _ in range(5):
            sums.add(step(x, x, labels, 1e-3))
    assert sum(mode.reads.values()) == 0, mode.reads
    with HostReads(monkeypatch) as mode:  # the log point: the one place that reads
        values, skipped, bad = sums.read()
    assert mode.reads and values["steps"] == 6 and skipped == 0 and bad is None


def test_epoch_sums_on_fake_cuda_stay_on_the_device():
    with FakeTensorMode(allow_non_fake_inputs=True):
        device = torch.device("cuda")
        sums = EpochSums(device, saved=torch.zeros(len(SUMS), dtype=torch.float64), taken=3)
        sums.add(torch.ones(len(SUMS), dtype=torch.float64, device=device))
        assert sums.sums.device.type == sums.first_skipped.device.type == "cuda"


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_non_finite_step_changes_nothing_and_is_counted(precision):
    step, x, labels = tiny_step(precision, skip_nonfinite=True)
    sums = EpochSums(CPU)
    sums.add(step(x, x, labels, 1e-3))
    before = {k: v.clone() for k, v in step.model.state_dict().items()}
    moments = {k: v.clone() for k, v in step.optimiser.state_dict()["state"][0].items()}
    sums.add(step(x * float("nan"), x, labels, 1e-3))
    after = step.model.state_dict()
    # weights and batch-norm statistics (num_batches_tracked still counts the batch)
    assert all(torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())
    for key, value in step.optimiser.state_dict()["state"][0].items():
        assert torch.equal(value, moments[key]), key  # moments and step count untouched
    values, skipped, bad = sums.read()
    assert values["steps"] == 1 and skipped == 1 and bad["index"] == 1
    assert bad["loss"] != bad["loss"]  # the skipped step's terms are kept for the message
    sums.add(step(x, x, labels, 1e-3))  # and training goes on
    assert sums.read()[0]["steps"] == 2


@pytest.mark.gpu
def test_cuda_steps_between_log_points_never_sync():
    """On a GPU, as pretrain runs it (bf16, channels-last, compiled): any host sync raises."""
    cfg = preset("digits", ndf=32, n_rkhs=256, n_depth=1, batch_size=64, precision="bf16")
    device = torch.device("cuda")
    model = AMDIM(cfg, 10).to(device, memory_format=torch.channels_last)
    step = TrainingStep(cfg, model, device, torch.compile(model))
    sums = EpochSums(device)
    x = torch.randn(64, 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (64,), device=device)
    for _ in range(3):  # compilation and Adam's state
        sums.add(step(x, x, labels, 1e-3))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            sums.add(step(x, x, labels, 1e-3))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sums.read()[0]["steps"] == 8


def test_a_compiled_model_can_be_stepped():
    """pretrain and benchmark pass torch.compile(model) on CUDA: the step must take it (a
    compiled module raises on bool(), as it has no len). Compiled here, never run."""
    cfg = preset("digits", ndf=8, n_rkhs=64, n_depth=1, batch_size=8)
    model = AMDIM(cfg, 10)
    step = TrainingStep(cfg, model, CPU, torch.compile(model))
    assert step.step_model is not model and step.model is model
