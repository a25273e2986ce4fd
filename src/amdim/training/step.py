"""One pretraining step, the same for `amdim pretrain`, `amdim benchmark` and the tests: both
views through the model under autocast, backward, Adam.

The step never waits for the device. A non-finite loss skips the update on the device (fused
Adam's `found_inf`, as the fp16 gradient scaler does), and the step's metrics are summed on the
device (`EpochSums`) until the caller reads them at a log point.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist

from ..config import PretrainConfig
from ..model.nce import OBJECTIVE_TERMS as NCE_TERMS
from ..runtime import autocast_for  # noqa: F401 (API: step.autocast_for)
# what each step adds to the epoch's sums: the NCE terms, losses, probe counts, and 1 for a
# step whose update was applied (a skipped, non-finite step adds nothing)
SUMS = NCE_TERMS + ("loss", "probe_loss", "correct_linear", "correct_mlp", "n_labelled", "steps")
LOSSES = SUMS[:len(NCE_TERMS) + 2]


def configure_device(device: torch.device) -> None:
    """What every training step on CUDA runs with (pretraining and its benchmark alike): TF32
    matmuls for any fp32 work, autotuned convolutions (the shapes never change in a run)."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.benchmark = True


def optimiser_for(cfg: PretrainConfig, model: torch.nn.Module) -> torch.optim.Adam:
    """The authors' Adam over every trained parameter, fused (one kernel per step on CUDA and
    CPU, and able to skip a step on the device through found_inf)."""
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                            eps=cfg.adam_eps, weight_decay=cfg.weight_decay, fused=True)


class TrainingStep:
    """step(view1, view2, labels, lr) -> (len(SUMS),) float64 on the device: the step's terms,
    and in `steps` 1 if its update was applied, 0 if the loss was not finite (then the weights,
    the optimiser's moments and its step count are left as they were).

    model: the AMDIM module (its parameters are optimised); step_model: what is called, the
    model itself or its DDP / compiled wrapper. With cfg.skip_nonfinite the batch-norm running
    statistics of a skipped step are restored too (a NaN batch would poison them for good):
    two small ops per statistic, so only where skipping is asked for; otherwise a non-finite
    step stops the run and its statistics are never saved."""

    def __init__(self, cfg: PretrainConfig, model: torch.nn.Module, device: torch.device,
                 step_model: Callable | None = None, world_size: int = 1):
        self.model = model
        # `is None`, not `or`: bool() of a compiled module raises (it asks for its len)
        self.step_model = model if step_model is None else step_model
        self.world_size = world_size
        self.optimiser = optimiser_for(cfg, model)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        self.autocast = autocast_for(cfg.precision, device)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.statistics = ([b for b in model.buffers() if b.is_floating_point()]
                           if cfg.skip_nonfinite else [])

    def forward_backward(self, view1: torch.Tensor, view2: torch.Tensor, labels: torch.Tensor,
                         model: Callable | None = None, more_views: Sequence[torch.Tensor] = ()
                         ) -> dict[str, torch.Tensor]:
        # more_views: the third and further views of a multiview.MultiViewAMDIM
        view1, view2, *more_views = (v.contiguous(memory_format=self.memory_format)
                                     for v in (view1, view2, *more_views))
        with self.autocast():
            out = (self.step_model if model is None else model)(view1, view2, labels, *more_views)
        self.optimiser.zero_grad(set_to_none=True)
        self.scaler.scale(out["loss"]).backward()  # frees the graph, even of a skipped step
        return out

    def __call__(self, view1: torch.Tensor, view2: torch.Tensor, labels: torch.Tensor,
                 lr: float, more_views: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        for group in self.optimiser.param_groups:
            group["lr"] = lr
        saved = torch._foreach_add(self.statistics, 0.0) if self.statistics else []  # copies
        out = self.forward_backward(view1, view2, labels, more_views=more_views)
        finite = torch.isfinite(out["loss"].detach()).float()
        if self.world_size > 1:  # the probes' loss is per rank: every rank skips together
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        for statistic, before in zip(self.statistics, saved):
            statistic.copy_(torch.where(finite > 0, statistic, before))
        if self.scaler.is_enabled():  # fp16: the scaler skips steps with non-finite gradients
            self.scaler.step(self.optimiser)
        else:
            self.optimiser.found_inf = 1 - finite  # read by fused Adam: skip on the device
            self.optimiser.step()
            del self.optimiser.found_inf
        self.scaler.update()
        return step_values(out, finite)


def step_values(out: dict[str, torch.Tensor], finite: torch.Tensor) -> torch.Tensor:
    """The model's outputs and the applied flag () -> (len(SUMS),) float64, on their device."""
    zero = finite.new_zeros(())
    return torch.stack([out.get(k, zero).detach().float() for k in SUMS[:-1]] + [finite]).double()


class EpochSums:
    """The epoch's sums of SUMS over applied steps, on the device, with the steps taken and
    the first skipped step (its index in the epoch and its raw terms). Only read() syncs."""

    def __init__(self, device: torch.device, saved: torch.Tensor | None = None, taken: int = 0):
        self.sums = torch.zeros(len(SUMS), dtype=torch.float64, device=device)
        if saved is not None:
            self.sums += saved.to(device)
        self.taken = torch.full((), taken, dtype=torch.float64, device=device)
        self.first_skipped = torch.full((len(SUMS) + 1,), -1.0, dtype=torch.float64,
                                        device=device)

    def add(self, values: torch.Tensor) -> None:
        applied = values[-1] > 0
        self.sums += torch.where(applied, values, 0.0)
        first = ~applied & (self.first_skipped[0] < 0)
        self.first_skipped = torch.where(first, torch.cat([self.taken.view(1), values]),
                                         self.first_skipped)
        self.taken += 1

    def read(self, world_size: int = 1) -> tuple[dict[str, float], int, dict | None]:
        """(sums averaged over ranks, steps skipped, the first skipped step's {"index",
        **terms} or None). Averages are what the metrics need: means and ratios of counts."""
        sums = self.sums.clone()
        if world_size > 1:
            dist.all_reduce(sums)
            sums /= world_size
        values = dict(zip(SUMS, sums.tolist()))
        skipped = round(self.taken.item() - values["steps"])
        first = self.first_skipped.tolist()
        bad = None if first[0] < 0 else {"index": int(first[0]), **dict(zip(LOSSES, first[1:]))}
        return values, skipped, bad
