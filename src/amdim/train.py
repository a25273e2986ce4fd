"""`amdim pretrain`: self-supervised pretraining with online probes, checkpoints and resume.

Reads top to bottom as the stages of a run: run folder and config, device and seed, data,
model, optimiser, resume, then the loop (steps, evaluation, metrics, checkpoint per epoch).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from . import checkpoint
from .config import PRESETS, PretrainConfig, preset
from .data import build_datasets
from .model import AMDIM

log = logging.getLogger("amdim")
CHECKPOINT = "checkpoint.pt"
# settings a resumed run may change; every other field must equal the saved run's
RESUMABLE = {"epochs", "workers", "device", "run_dir", "data_root", "download", "log_every",
             "final_probe", "skip_nonfinite"}
NCE_TERMS = ("loss_1t5", "loss_1t7", "loss_5t5", "score_reg")


class TrainingError(RuntimeError):
    """A run that cannot start or go on, with what to do about it."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


class EpochSampler(Sampler[int]):
    """This rank's share of the epoch's shuffled order, from position `start` (in this rank's
    share). The order depends only on (seed, epoch), so a resumed run sees the same images."""

    def __init__(self, n: int, seed: int, epoch: int, start: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.n, self.seed, self.epoch, self.start = n, seed, epoch, start
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(
            self.seed * 1_000_003 + self.epoch))
        return iter(order[self.rank::self.world_size][self.start:].tolist())

    def __len__(self) -> int:
        return max(0, len(range(self.rank, self.n, self.world_size)) - self.start)


def lr_factor(step: int, steps_per_epoch: int, cfg: PretrainConfig) -> float:
    """Linear warmup over the first warmup_steps steps, times lr_gamma per milestone passed."""
    warmup = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    epoch = step // steps_per_epoch
    return warmup * cfg.lr_gamma ** sum(epoch >= m for m in cfg.lr_milestones)


class StopOnSignal:
    """SIGINT/SIGTERM set `requested`; the loop saves and stops at the next step boundary.
    A second SIGINT interrupts at once."""

    def __init__(self):
        self.requested: str | None = None

    def _handle(self, number, frame):
        if self.requested and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(number).name
        log.warning("%s received: saving a checkpoint at the end of this step", self.requested)

    def __enter__(self):
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)


@torch.no_grad()
def probe_accuracy(model: AMDIM, loader: DataLoader, device: torch.device, autocast
                   ) -> dict[str, float]:
    """Test accuracy of the online probes on the whole test set (eval mode: no dropout, no
    batch-norm statistics updated)."""
    was_training = model.training
    model.eval()
    correct = torch.zeros(2, device=device)
    count = 0
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device)
        with autocast():
            logits_mlp, logits_linear = model.probes(model.encoder(images).r1)
        correct += torch.stack([(logits_linear.argmax(1) == labels).sum(),
                                (logits_mlp.argmax(1) == labels).sum()])
        count += len(labels)
    model.train(was_training)
    linear, mlp = (correct / max(count, 1)).tolist()
    return {"test_linear_acc": linear, "test_mlp_acc": mlp}


def _check_same_run(saved: dict, cfg: PretrainConfig, path: Path) -> None:
    current = cfg.to_dict()
    diffs = [f"{k}: saved {saved.get(k)!r}, requested {current[k]!r}" for k in current
             if k not in RESUMABLE and _plain(saved.get(k)) != _plain(current[k])]
    if diffs:
        raise TrainingError(
            f"{path} holds a run with other settings ({'; '.join(diffs)}). Resume it with the "
            "same settings, or start a new run with another --run-dir.")


def _plain(value):
    return list(value) if isinstance(value, (tuple, list)) else value


def _autocast(cfg: PretrainConfig, device: torch.device):
    if cfg.precision == "fp32":
        return nullcontext
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def pretrain(cfg: PretrainConfig) -> dict:
    """Run (or resume) pretraining as configured; returns the last epoch's metrics."""
    # -- run folder and config
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CHECKPOINT
    # -- device and seed
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    autocast = _autocast(cfg, device)
    # -- data
    train_set, test_set, n_classes = build_datasets(cfg)
    steps_per_epoch = len(train_set) // cfg.batch_size
    if steps_per_epoch == 0:
        raise TrainingError(f"the training set has {len(train_set)} images, fewer than one "
                            f"batch of {cfg.batch_size}; lower --batch-size")
    if cfg.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.steps_per_epoch)
    # -- model and optimiser
    model = AMDIM(cfg, n_classes).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                 eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                                 fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    # -- resume
    epoch, step_in_epoch, step = 0, 0, 0
    if path.exists():
        state = checkpoint.load(path)
        _check_same_run(state["config"], cfg, path)
        model.encoder.load_state_dict(state["encoder"])
        for name in ("probes", "mixture_head"):
            if getattr(model, name) is not None:
                getattr(model, name).load_state_dict(state[name])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        epoch, step_in_epoch, step = state["epoch"], state["step_in_epoch"], state["step"]
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        log.info("resuming %s at epoch %d, step %d", path, epoch, step)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    def save() -> None:
        state = {"format": checkpoint.FORMAT, "config": cfg.to_dict(), "n_classes": n_classes,
                 "encoder": model.encoder.state_dict(),
                 "probes": model.probes.state_dict() if model.probes else None,
                 "mixture_head": model.mixture_head.state_dict() if model.mixture_head else None,
                 "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                 "epoch": epoch, "step_in_epoch": step_in_epoch, "step": step,
                 "rng": {"torch": torch.get_rng_state(),
                         "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []}}
        checkpoint.save_atomic(state, path)

    test_loader = None
    if test_set is not None and n_classes:
        # the whole test set, in order, nothing dropped
        test_loader = DataLoader(test_set, batch_size=cfg.batch_size, shuffle=False,
                                 num_workers=cfg.workers, pin_memory=device.type == "cuda")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir))
    metrics: dict = {}
    # -- the loop
    with StopOnSignal() as stop:
        while epoch < cfg.epochs:
            model.train()
            sampler = EpochSampler(len(train_set), cfg.seed, epoch,
                                   start=step_in_epoch * cfg.batch_size)
            loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler,
                                drop_last=True, num_workers=cfg.workers,
                                pin_memory=device.type == "cuda",
                                generator=torch.Generator().manual_seed(
                                    cfg.seed + 7919 * epoch + step_in_epoch))
            totals = torch.zeros(len(NCE_TERMS) + 5, dtype=torch.float64)
            start, images_seen = time.perf_counter(), 0
            bar = tqdm(total=steps_per_epoch, initial=step_in_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       unit="step", mininterval=1.0, dynamic_ncols=True)
            for (x1, x2), labels in loader:
                if step_in_epoch >= steps_per_epoch:
                    break
                for group in optimizer.param_groups:
                    group["lr"] = cfg.lr * lr_factor(step, steps_per_epoch, cfg)
                x1, x2 = x1.to(device, non_blocking=True), x2.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                with autocast():
                    out = model(x1, x2, labels)
                values = torch.stack([out[k].detach().double() for k in NCE_TERMS] + [
                    out["loss"].detach().double()] + [
                    out.get(k, torch.zeros((), device=device)).detach().double()
                    for k in ("probe_loss", "correct_linear", "correct_mlp", "n_labelled")]).cpu()
                if not torch.isfinite(values).all():
                    message = (f"non-finite loss at step {step} (epoch {epoch + 1}): "
                               + ", ".join(f"{k}={v:.4g}" for k, v in zip(NCE_TERMS + ("loss",), values.tolist())))
                    if not cfg.skip_nonfinite:
                        raise TrainingError(message + f"; the last good checkpoint is {path}. "
                                            "Lower --lr, use --precision fp32, or pass "
                                            "--skip-nonfinite to skip such batches")
                    log.warning(message + "; batch skipped")
                    step_in_epoch += 1
                    step += 1
                    bar.update()
                    continue
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(out["loss"]).backward()
                scaler.step(optimizer)
                scaler.update()
                totals += values
                step_in_epoch += 1
                step += 1
                images_seen += len(labels)
                images_per_s = images_seen / (time.perf_counter() - start)
                bar.update()
                bar.set_postfix(loss=f"{values[4]:.3f}", img_s=f"{images_per_s:.0f}",
                                lin_acc=f"{values[6] / max(values[8], 1):.3f}", refresh=False)
                if step % cfg.log_every == 0:
                    for name, value in zip(NCE_TERMS + ("loss",), values.tolist()):
                        writer.add_scalar(f"train/{name}", value, step)
                    writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], step)
                if stop.requested:
                    bar.close()
                    save()
                    log.info("stopped by %s at step %d; checkpoint %s (run the same command "
                             "to resume)", stop.requested, step, path)
                    writer.close()
                    return {**metrics, "stopped": stop.requested, "step": step}
            bar.close()
            n = max(step_in_epoch, 1)
            metrics = {"epoch": epoch + 1, "step": step, "lr": optimizer.param_groups[0]["lr"],
                       **{k: totals[i].item() / n for i, k in enumerate(NCE_TERMS + ("loss", "probe_loss"))},
                       "images_per_s": images_seen / (time.perf_counter() - start)}
            if n_classes:
                labelled = max(totals[8].item(), 1)
                metrics["train_linear_acc"] = totals[6].item() / labelled
                metrics["train_mlp_acc"] = totals[7].item() / labelled
            if test_loader is not None:
                metrics.update(probe_accuracy(model, test_loader, device, autocast))
            for name, value in metrics.items():
                writer.add_scalar(f"epoch/{name}", value, epoch + 1)
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            log.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in metrics.items()))
            epoch, step_in_epoch = epoch + 1, 0
            save()
    writer.close()
    if cfg.final_probe and test_set is not None and n_classes:
        metrics.update(compare_with_random_init(model.encoder, cfg, train_set, test_set, device))
    return metrics


@torch.no_grad()
def _features(encoder, dataset: Dataset, device: torch.device, batch_size: int):
    encoder.eval()
    chunks, labels = [], []
    for images, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        chunks.append(encoder.global_features(images.to(device)).float().cpu())
        labels.append(y)
    return torch.cat(chunks).numpy(), torch.cat(labels).numpy()


def linear_probe_accuracy(encoder, train_set: Dataset, test_set: Dataset, device: torch.device,
                          batch_size: int = 256) -> float:
    """Test accuracy of a logistic regression fitted on frozen, standardised global features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train, y_train = _features(encoder, train_set, device, batch_size)
    x_test, y_test = _features(encoder, test_set, device, batch_size)
    keep = y_train >= 0
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(x_train[keep], y_train[keep])
    return float(probe.score(x_test, y_test))


def compare_with_random_init(encoder, cfg: PretrainConfig, train_set: Dataset, test_set: Dataset,
                             device: torch.device) -> dict[str, float]:
    """Linear-probe accuracy of the trained encoder next to the same architecture at random init."""
    # the training images with the deterministic test transform
    train_plain = copy.copy(train_set)
    train_plain.transform = test_set.transform
    torch.manual_seed(cfg.seed)
    random_init = type(encoder)(encoder.cfg).to(device)
    trained = linear_probe_accuracy(encoder, train_plain, test_set, device)
    baseline = linear_probe_accuracy(random_init, train_plain, test_set, device)
    print(f"linear probe on frozen features: trained encoder {100 * trained:.1f}% | "
          f"same architecture at random init {100 * baseline:.1f}%")
    return {"final_linear_probe_acc": trained, "random_init_linear_probe_acc": baseline}


# -- command line


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per PretrainConfig field (n_rkhs -> --n-rkhs); unset flags keep the preset's value."""
    for field in dataclasses.fields(PretrainConfig):
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        kwargs = dict(default=None, help=f"{field.metadata['help']} (default {default!r})")
        if field.metadata["choices"]:
            kwargs["choices"] = field.metadata["choices"]
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif isinstance(default, tuple):
            parser.add_argument(flag, type=int, nargs="*", metavar="EPOCH", **kwargs)
        else:
            parser.add_argument(flag, type=type(default), **kwargs)


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainConfig)
                 if getattr(args, f.name) is not None}
    return preset(args.preset, **overrides)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "pretrain", help="self-supervised pretraining of an AMDIM encoder",
        description="Pretrain an AMDIM encoder. With no flags: a small model on the handwritten "
        "digits shipped in scikit-learn (offline, a few minutes on a CPU), ending with a "
        "linear-probe comparison against random initialisation. Real data: e.g. "
        "--preset cifar-small --data /path/to/cifar10 (a folder with train/<class>/ and "
        "test/<class>/) --run-dir runs/cifar. Rerunning a command resumes its run folder. "
        "Defaults below are the plain defaults; a preset changes some of them.")
    parser.add_argument("--preset", default="digits", choices=sorted(PRESETS),
                        help="named defaults: " + "; ".join(
                            f"{k}: {v.get('image_size')} px ndf {v.get('ndf')} n_rkhs "
                            f"{v.get('n_rkhs')} n_depth {v.get('n_depth')}" for k, v in PRESETS.items()))
    add_config_flags(parser)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    try:
        cfg = config_from_args(args)
        metrics = pretrain(cfg)
    except (ValueError, TrainingError, checkpoint.CheckpointError) as error:
        raise SystemExit(f"amdim pretrain: {error}") from None
    print(json.dumps(metrics, indent=2))
