"""`amdim pretrain`: self-supervised pretraining with online probes, checkpoints and resume.

Reads top to bottom as the stages of a run: run folder and config, device and seed, data,
model, optimiser, resume, then the loop (steps, evaluation, metrics, checkpoint per epoch).
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import checkpoint, distributed
from .batches import choose_data_path, make_batches
from .config import (PRESETS, PretrainConfig, add_config_flags, config_from_args,
                     milestone_factor, resolve_device)
from .data import DataError, build_datasets, skipped_files
from .evaluate import compare_with_random_init
from .model import AMDIM

log = logging.getLogger("amdim")
CHECKPOINT = "checkpoint.pt"
# settings a resumed run may change; every other field must equal the saved run's
RESUMABLE = {"epochs", "workers", "device", "run_dir", "data_root", "download", "log_every",
             "final_probe", "skip_nonfinite", "strict_data", "data_path", "compile", "time_limit"}
NCE_TERMS = ("loss_1t5", "loss_1t7", "loss_5t5", "score_reg")
# what each step adds to the epoch's sums (in the checkpoint, so a resumed epoch reports all
# of its steps): the NCE terms, losses and probe counts, then the counted steps
SUMS = NCE_TERMS + ("loss", "probe_loss", "correct_linear", "correct_mlp", "n_labelled", "steps")


class TrainingError(RuntimeError):
    """A run that cannot start or go on, with what to do about it."""


def lr_factor(step: int, steps_per_epoch: int, cfg: PretrainConfig) -> float:
    """Linear warmup over the first warmup_steps steps, times the step decay of the epoch."""
    warmup = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    return warmup * milestone_factor(step // steps_per_epoch, cfg.lr_milestones, cfg.lr_gamma)


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


@contextmanager
def _explain_out_of_memory(cfg: PretrainConfig, path: Path):
    try:
        yield
    except torch.OutOfMemoryError:
        raise TrainingError(
            f"out of GPU memory with batch_size {cfg.batch_size}: lower --batch-size (e.g. "
            f"--batch-size {max(2, cfg.batch_size // 2)}), use --precision bf16, or a smaller "
            f"model; the last checkpoint {path} is kept and the run resumes from it") from None


def _keep_metrics_until(path: Path, epoch: int) -> dict:
    """Drop the metrics of epochs after the checkpoint's (written before a crash that lost
    their checkpoint; they will be trained again) and torn lines; return the last kept line."""
    if not path.exists():
        return {}
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["epoch"] <= epoch:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    path.write_text("".join(line + "\n" for line in kept))
    return json.loads(kept[-1]) if kept else {}


def autocast_for(cfg: PretrainConfig, device: torch.device):
    """A factory of the autocast context of cfg.precision (a no-op for fp32)."""
    if cfg.precision == "fp32":
        return nullcontext
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def optimiser_for(cfg: PretrainConfig, model: torch.nn.Module, device: torch.device
                  ) -> torch.optim.Adam:
    """The authors' Adam over every trained parameter (fused kernels on CUDA)."""
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                            eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                            fused=device.type == "cuda")


def pretrain(cfg: PretrainConfig) -> dict:
    """Run (or resume) pretraining as configured; returns the last epoch's metrics.
    Under torchrun, every rank runs this; rank 0 alone logs and writes files."""
    # -- processes, device and seed
    started = time.perf_counter()
    device = resolve_device(cfg.device)
    rank, world_size, local_rank = distributed.setup(device.type)
    main_rank = rank == 0
    if cfg.batch_size % world_size:
        raise TrainingError(f"batch_size {cfg.batch_size} (the global batch) must be divisible "
                            f"by the {world_size} processes")
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    autocast = autocast_for(cfg, device)
    # -- run folder
    run_dir = Path(cfg.run_dir)
    path = run_dir / CHECKPOINT
    if main_rank:
        run_dir.mkdir(parents=True, exist_ok=True)
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
    if device.type == "cuda":  # convolutions run fastest on NHWC (before DDP sizes its buckets)
        model.to(memory_format=torch.channels_last)
    step_model = model  # what the training step calls: DDP's wrapper when distributed
    if world_size > 1:
        model = distributed.synchronise_batchnorm(model, device)
        model.gather = distributed.gather
        step_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.type == "cuda" else None)
    optimizer = optimiser_for(cfg, model, device)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    torch.manual_seed(cfg.seed + rank)  # augmentations differ between ranks
    # -- resume
    epoch, step_in_epoch, step, chosen_path = 0, 0, 0, None
    sums, skipped_batches = torch.zeros(len(SUMS), dtype=torch.float64), 0
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
        chosen_path = state["data_path"]
        sums, skipped_batches = state["epoch_sums"], state["skipped_batches"]
        rng = state["rng"]
        if len(rng) == world_size:  # each rank continues its own random stream
            torch.set_rng_state(rng[rank]["torch"])
            if device.type == "cuda" and rng[rank]["cuda"] is not None:
                torch.cuda.set_rng_state(rng[rank]["cuda"], device)
        else:
            log.warning("resuming with %d processes where %d saved: random streams restart",
                        world_size, len(rng))
        if main_rank and epoch >= cfg.epochs:
            log.info("%s has already finished its %d epochs (pass a larger --epochs to train "
                     "on)", path, epoch)
        elif main_rank:
            log.info("resuming %s at epoch %d, step %d", path, epoch, step)
    if main_rank:
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    # a resumed run keeps its path (the two paths order batches differently); ranks agree
    data_path = [chosen_path or choose_data_path(cfg, train_set, device)]
    if world_size > 1:
        torch.distributed.broadcast_object_list(data_path, src=0)
    data_path = data_path[0]
    train_batches, test_batches = make_batches(
        cfg, data_path, train_set, test_set if n_classes and main_rank else None, device, rank,
        world_size)
    if main_rank:
        log.info("data path: %s; %d steps per epoch", data_path, steps_per_epoch)
    if device.type == "cuda" and cfg.compile:
        step_model = torch.compile(step_model)

    def save() -> None:
        rng = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        rngs = [rng]
        if world_size > 1:
            rngs = [None] * world_size
            torch.distributed.all_gather_object(rngs, rng)
        if main_rank:
            try:
                checkpoint.save_atomic({
                    "format": checkpoint.FORMAT, "config": cfg.to_dict(), "n_classes": n_classes,
                    "encoder": model.encoder.state_dict(),
                    "probes": model.probes.state_dict() if model.probes else None,
                    "mixture_head": model.mixture_head.state_dict() if model.mixture_head else None,
                    "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                    "epoch": epoch, "step_in_epoch": step_in_epoch, "step": step, "rng": rngs,
                    "data_path": data_path, "epoch_sums": sums,
                    "skipped_batches": skipped_batches},
                    path)
            except OSError as error:  # e.g. a full disk: save_atomic left the old file intact
                raise TrainingError(
                    f"could not write the checkpoint {path} ({error.strerror or error}); the "
                    "previous checkpoint there is kept. Free some space and run the same "
                    "command to resume.") from None
        if world_size > 1:
            torch.distributed.barrier()

    writer = None
    if main_rank:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir))
    memory_format = torch.channels_last if device.type == "cuda" else torch.preserve_format
    metrics = _keep_metrics_until(run_dir / "metrics.jsonl", epoch) if main_rank else {}
    # -- the loop
    with StopOnSignal() as stop, _explain_out_of_memory(cfg, path):
        while epoch < cfg.epochs:
            model.train()
            train_batches.set_epoch(epoch, step_in_epoch)
            start, images_seen = time.perf_counter(), 0
            bar = tqdm(total=steps_per_epoch, initial=step_in_epoch, disable=not main_rank,
                       desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", mininterval=1.0,
                       dynamic_ncols=True)
            for (x1, x2), labels in train_batches:
                if step_in_epoch >= steps_per_epoch:
                    break
                for group in optimizer.param_groups:
                    group["lr"] = cfg.lr * lr_factor(step, steps_per_epoch, cfg)
                if cfg.time_limit and time.perf_counter() - started > 60 * cfg.time_limit:
                    stop.requested = stop.requested or "time limit"
                x1, x2 = (x.to(device, non_blocking=True, memory_format=memory_format)
                          for x in (x1, x2))
                labels = labels.to(device, non_blocking=True)
                with autocast():
                    out = step_model(x1, x2, labels)
                zero = torch.zeros((), device=device)
                values = torch.stack([out.get(k, zero).detach().double() for k in SUMS[:-1]]
                                     + [torch.tensor(float(bool(stop.requested)), device=device,
                                                     dtype=torch.float64)])
                if world_size > 1:  # every rank takes the same decisions below
                    torch.distributed.all_reduce(values)
                    values[:len(NCE_TERMS) + 2] /= world_size
                values, stop_now = values[:-1].cpu(), values[-1].item() > 0
                if not torch.isfinite(values).all():
                    message = (f"non-finite loss at step {step} (epoch {epoch + 1}): " + ", ".join(
                        f"{k}={v:.4g}" for k, v in zip(SUMS[:len(NCE_TERMS) + 1], values.tolist())))
                    if not cfg.skip_nonfinite:
                        raise TrainingError(message + f"; the last good checkpoint is {path}. "
                                            "Lower --lr, use --precision fp32, or pass "
                                            "--skip-nonfinite to skip such batches")
                    log.warning(message + "; batch skipped")
                    skipped_batches += 1
                else:
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(out["loss"]).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    sums += torch.cat([values, torch.ones(1, dtype=torch.float64)])
                    images_seen += len(labels) * world_size
                step_in_epoch += 1
                step += 1
                bar.update()
                bar.set_postfix(loss=f"{values[4]:.3f}", refresh=False,
                                img_s=f"{images_seen / (time.perf_counter() - start):.0f}",
                                lin_acc=f"{values[6] / max(values[8], 1):.3f}")
                if writer is not None and step % cfg.log_every == 0:
                    for name, value in zip(SUMS[:len(NCE_TERMS) + 1], values.tolist()):
                        writer.add_scalar(f"train/{name}", value, step)
                    writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], step)
                if stop_now:
                    bar.close()
                    save()
                    if main_rank:
                        log.info("stopped at step %d; checkpoint %s (run the same command to "
                                 "resume)", step, path)
                        writer.close()
                    return {**metrics, "stopped": stop.requested or "signal", "step": step}
            bar.close()
            mean = dict(zip(SUMS, (sums / max(sums[-1].item(), 1)).tolist()))
            metrics = {"epoch": epoch + 1, "step": step, "lr": optimizer.param_groups[0]["lr"],
                       **{k: mean[k] for k in NCE_TERMS + ("loss", "probe_loss")},
                       "images_per_s": images_seen / (time.perf_counter() - start)}
            if skipped_batches:
                metrics["skipped_batches"] = skipped_batches
            bad_files = skipped_files(train_set) + (skipped_files(test_set) if test_set else [])
            if bad_files:  # unreadable images left out (each named in a warning)
                metrics["skipped_files"] = len(bad_files)
            if n_classes:
                labelled = max(mean["n_labelled"], 1e-12)  # (ratios of means = ratios of sums)
                metrics["train_linear_acc"] = mean["correct_linear"] / labelled
                metrics["train_mlp_acc"] = mean["correct_mlp"] / labelled
            if test_batches is not None:
                metrics.update(probe_accuracy(model, test_batches, device, autocast))
            if main_rank:
                for name, value in metrics.items():
                    writer.add_scalar(f"epoch/{name}", value, epoch + 1)
                with open(run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(metrics) + "\n")
                log.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in metrics.items()))
            epoch, step_in_epoch = epoch + 1, 0
            sums = torch.zeros(len(SUMS), dtype=torch.float64)
            save()
    if writer is not None:
        writer.close()
    if cfg.final_probe and test_set is not None and n_classes and main_rank:
        metrics.update(compare_with_random_init(model.encoder, cfg.seed, train_set, test_set, device))
    return metrics


# -- command line


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
    except (ValueError, TrainingError, DataError, checkpoint.CheckpointError) as error:
        raise SystemExit(f"amdim pretrain: {error}") from None
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    print(json.dumps(metrics, indent=2))
