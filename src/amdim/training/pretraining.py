"""Self-supervised pretraining with online probes, checkpoints and resume (what `amdim
pretrain` runs; its flags are in pretrain_command).

`Pretraining` holds a run's state and reads as its stages: processes and device; data; model
and optimiser, restored from the run folder's checkpoint when there is one; then per epoch the
steps (step.TrainingStep), the evaluation and the metrics line, and the checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..config import PretrainConfig, milestone_factor
from ..data.datasets import resolved_data
from ..data.image_files import skipped_files
from ..model import multiview
from ..model.amdim import AMDIM
from ..model.frozen_features import compare_with_random_init
from ..runtime import autocast_for, resolve_device, resolve_runtime
from ..views.view_sets import check_colour
from . import checkpoint, distributed
from .inputs import build_datasets, build_view_datasets, choose_data_path, make_batches
from .run_folder import (CHECKPOINT, EXIT_CODES, EventLog, StopOnSignal, Stopped,  # noqa: F401
                         TrainingError, check_same_run, explain_out_of_memory, keep_files_of_lost_run,
                         keep_metrics_until, locked)
from .step import LOSSES, NCE_TERMS, EpochSums, TrainingStep, configure_device

log = logging.getLogger("amdim")


def lr_factor(step: int, steps_per_epoch: int, cfg: PretrainConfig) -> float:
    """Linear warmup over the first warmup_steps steps, times the step decay of the epoch."""
    warmup = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    return warmup * milestone_factor(step // steps_per_epoch, cfg.lr_milestones, cfg.lr_gamma)


@torch.no_grad()
def probe_accuracy(model: AMDIM, loader: DataLoader, device: torch.device, autocast
                   ) -> dict[str, float]:
    """Test accuracy of the online probes on the whole test set (eval mode: no dropout, no
    batch-norm statistics updated)."""
    if isinstance(model, multiview.MultiViewAMDIM):  # probes per view and on all views
        return multiview.probe_accuracy(model, loader, device, autocast)
    was_training = model.training
    model.eval()
    correct = torch.zeros(2, device=device)
    count = 0
    for images, labels in tqdm(loader, desc="test probes", unit="batch", leave=False,
                               mininterval=1.0):
        images, labels = images.to(device, non_blocking=True), labels.to(device)
        with autocast():
            logits_mlp, logits_linear = model.probes(model.encoder(images).r1)
        correct += torch.stack([(logits_linear.argmax(1) == labels).sum(),
                                (logits_mlp.argmax(1) == labels).sum()])
        count += len(labels)
    model.train(was_training)
    linear, mlp = (correct / max(count, 1)).tolist()
    return {"test_linear_acc": linear, "test_mlp_acc": mlp}


def pretrain(cfg: PretrainConfig, view_data=None) -> dict:
    """Run (or resume) pretraining as configured; returns the last epoch's metrics (with
    "stopped": SIGINT, SIGTERM or "time limit" when it stopped early to be resumed).
    Under torchrun, every rank runs this; rank 0 alone locks the run folder, logs and
    writes files. view_data: with cfg.views "paired", your own views instead of cfg.data's:
    a Dataset of ((K uint8 arrays (H, W, C)), label), or (train, test or None) such sets."""
    run_dir, main_rank = Path(cfg.run_dir), int(os.environ.get("RANK", "0")) == 0
    # every phase stops within moments of a signal or the time limit; the steps and the
    # checkpoint's write finish first (StopOnSignal.deferred)
    try:
        with StopOnSignal(cfg.time_limit) as stop, \
                (locked(run_dir) if main_rank else nullcontext()), \
                explain_out_of_memory(cfg, run_dir / CHECKPOINT):
            if main_rank:
                keep_files_of_lost_run(run_dir)
            return Pretraining(cfg, view_data).run(stop)
    except Stopped as stopped:  # before the first step or in the final probe: nothing to save
        if main_rank:
            log.info("stopped (%s); run the same command to resume%s", stopped.reason,
                     f" from {run_dir / CHECKPOINT}" if (run_dir / CHECKPOINT).exists() else "")
        return {"stopped": stopped.reason}
    except RuntimeError as error:  # loader workers sent the signal too (SLURM signals them all)
        reason = _worker_stopped(error)
        if reason is None:
            raise
        if main_rank:
            log.warning("the data loader's workers were stopped by %s; run the same command to "
                        "resume%s", reason, f" from {run_dir / CHECKPOINT}"
                        if (run_dir / CHECKPOINT).exists() else "")
        return {"stopped": reason}


def _worker_stopped(error: RuntimeError) -> str | None:
    """SIGTERM or SIGINT when `error` is DataLoader's report of a worker ended by it."""
    text = str(error)
    if "DataLoader worker" not in text:
        return None
    return ("SIGTERM" if "Terminated" in text else "SIGINT" if "Interrupt" in text else None)


class Pretraining:
    """One run's state, built stage by stage (processes, data, model, restore, batches);
    run() trains it to cfg.epochs, one epoch at a time."""

    def __init__(self, cfg: PretrainConfig, view_data=None):
        self.started, self.view_data = time.perf_counter(), view_data
        self._setup_processes(cfg)
        self._build_data()
        self._build_model()
        self._restore()
        test_set = self.test_set if self.n_classes and self.main_rank else None
        self.train_batches, self.test_batches = make_batches(
            self.cfg, self.data_path, self.train_set, test_set, self.device, self.rank,
            self.world_size)
        self.writer = None
        self.saved_at = time.perf_counter()  # the last checkpoint (cfg.checkpoint_every)

    # -- setting up

    def _setup_processes(self, cfg: PretrainConfig) -> None:
        self.rank, self.world_size, self.device = distributed.setup(resolve_device(cfg.device))
        self.main_rank = self.rank == 0
        if cfg.batch_size % self.world_size:
            raise TrainingError(f"batch_size {cfg.batch_size} (the global batch) must be "
                                f"divisible by the {self.world_size} processes")
        configure_device(self.device)
        # the data path absolute: other spellings and working folders name the same data
        self.cfg, self.run_dir = replace(cfg, data=resolved_data(cfg.data)), Path(cfg.run_dir)
        self.path = self.run_dir / CHECKPOINT
        self.state = checkpoint.load(self.path) if self.path.exists() else None
        if self.state is not None and self.state.get("format") != checkpoint.FORMAT:
            kind = ("the authors' checkpoint" if checkpoint.is_authors(self.state)
                    else "an encoder exported by amdim export"
                    if self.state.get("format") == checkpoint.ENCODER_FORMAT
                    else f"a checkpoint of format {self.state.get('format')!r}")
            raise TrainingError(f"{self.path} is {kind}, not a run of amdim pretrain to resume: "
                                "move it out of the run folder, or pass another --run-dir")

    def _build_data(self) -> None:
        cfg = self.cfg
        self.layout = None  # --views augment: two augmented views, one encoder
        if cfg.views == "augment":
            self.train_set, self.test_set, self.n_classes = build_datasets(cfg)
        else:  # the data's views, or L and ab: one encoder per view or one shared
            self.train_set, self.test_set, self.n_classes = build_view_datasets(
                cfg, self.view_data)
            self.layout = multiview.view_layout(self.train_set.layout, cfg.view_encoders,
                                                cfg.views)
            if cfg.views == "lab":  # grey images: a constant ab view
                check_colour(self.train_set.source, cfg.data)
        if cfg.final_probe and not (self.n_classes and self.test_set is not None):
            if self.main_rank:
                log.warning("--final-probe needs labels and a test split; %s has %s: no final "
                            "probe", cfg.data, "no test split" if self.n_classes else "no labels")
            cfg = self.cfg = replace(cfg, final_probe=False)  # config.json records what runs
        self.fingerprint = {"train_images": len(self.train_set), "n_classes": self.n_classes}
        saved = (self.state or {}).get("data_fingerprint") or self.fingerprint
        if saved["n_classes"] != self.n_classes:
            raise TrainingError(f"{self.path} was trained on data with {saved['n_classes']} "
                                f"classes; {cfg.data} has {self.n_classes}. Resume on the same "
                                "data, or start a new run with another --run-dir")
        if saved["train_images"] != len(self.train_set):
            log.warning("%s was trained on %d training images; %s has %d now", self.path,
                        saved["train_images"], cfg.data, len(self.train_set))
        steps = len(self.train_set) // cfg.batch_size
        if steps == 0:
            raise TrainingError(f"the training set has {len(self.train_set)} images, fewer than "
                                f"one batch of {cfg.batch_size}; lower --batch-size")
        self.steps_per_epoch = min(steps, cfg.steps_per_epoch or steps)
        # a resumed run keeps its data path (the two build views differently); ranks agree
        path = [self.state["data_path"] if self.state
                else choose_data_path(cfg, self.train_set, self.device, self.world_size)]
        if self.world_size > 1:
            torch.distributed.broadcast_object_list(path, src=0)
        self.data_path = path[0]
        here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # processes sharing these cores
        self.cfg = resolve_runtime(cfg, self.device, self.data_path, here)
        torch.set_num_threads(self.cfg.threads)
        if self.state:
            check_same_run(self.state["config"], self.cfg, self.path)
            try:
                multiview.check_layout(self.state.get("views"), self.layout, self.path)
            except ValueError as error:
                raise TrainingError(str(error)) from None
        # config.json records the path taken (auto resolved), once the settings are checked
        self.cfg = replace(self.cfg, data_path=self.data_path)

    def _build_model(self) -> None:
        cfg, device = self.cfg, self.device
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model = model = multiview.build_model(cfg, self.n_classes, self.layout).to(device)
        if cfg.channels_last:  # before DDP sizes its buckets
            model.to(memory_format=torch.channels_last)
        step_model = model
        if self.world_size > 1:
            distributed.synchronise_batchnorm(model.encoder)
            model.gather = distributed.gather
            step_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        if device.type == "cuda" and cfg.compile:
            step_model = torch.compile(step_model)
        self.train_step = TrainingStep(cfg, model, device, step_model, self.world_size)
        torch.manual_seed(cfg.seed + self.rank)  # augmentations differ between ranks

    def _restore(self) -> None:
        self.epoch = self.step_in_epoch = self.step = self.skipped_batches = 0
        self._skipped_seen = 0  # skipped steps of this epoch already warned about
        state = self.state
        if state is None:
            self.sums = EpochSums(self.device)
            return
        self.model.encoder.load_state_dict(state["encoder"])
        for name in ("probes", "mixture_head"):
            if getattr(self.model, name) is not None:
                getattr(self.model, name).load_state_dict(state[name])
        self.train_step.optimiser.load_state_dict(state["optimizer"])
        self.train_step.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch, self.step = (state[k] for k in
                                                     ("epoch", "step_in_epoch", "step"))
        self.skipped_batches = state["skipped_batches"]  # in the epochs before this one
        self.sums = EpochSums(self.device, state["epoch_sums"], self.step_in_epoch)
        rng = state["rng"]
        if len(rng) == self.world_size:  # each rank continues its own random stream
            torch.set_rng_state(rng[self.rank]["torch"])
            if self.device.type == "cuda" and rng[self.rank]["cuda"] is not None:
                torch.cuda.set_rng_state(rng[self.rank]["cuda"], self.device)
        else:
            log.warning("resuming with %d processes where %d saved: random streams restart",
                        self.world_size, len(rng))
        if self.main_rank and self.epoch >= self.cfg.epochs:
            log.info("%s has already finished its %d epochs (pass a larger --epochs to train "
                     "on)", self.path, self.epoch)
        elif self.main_rank:
            log.info("resuming %s at epoch %d, step %d", self.path, self.epoch, self.step)

    # -- training

    def run(self, stop: StopOnSignal | None = None) -> dict:
        """Train to cfg.epochs, then the final probe. stop: the run's StopOnSignal (pretrain()
        enters one; without it, signals keep their handlers)."""
        cfg = self.cfg
        stop = stop if stop is not None else StopOnSignal()
        metrics = {}
        if self.main_rank:
            with stop.deferred():  # files are never left half-written
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2)
                                                          + "\n")
                metrics = keep_metrics_until(self.run_dir / "metrics.jsonl", self.epoch)
                self.writer = EventLog(self.run_dir)
            log.info("data path %s, %d steps per epoch, %s, %s, %d compute threads, %d loader "
                     "workers", self.data_path, self.steps_per_epoch, cfg.precision,
                     "channels-last" if cfg.channels_last else "NCHW", cfg.threads, cfg.workers)
        try:
            with stop.immediate():  # a stop that came while writing those files
                pass
            with stop.deferred():
                while self.epoch < cfg.epochs:
                    # an epoch's steps, its metrics line and checkpoint; a stop saves first
                    finished = self._train_epoch(stop)
                    if finished:
                        metrics = self._end_epoch(stop) or metrics
                    if not finished or self._stop_now(stop, True):
                        if self.main_rank:
                            log.info("stopped at step %d; checkpoint %s (run the same command "
                                     "to resume)", self.step, self.path)
                        return {**metrics, "stopped": stop.requested or "signal",
                                "step": self.step}
        finally:
            if self.writer is not None:
                self.writer.close()
        if cfg.final_probe and self.test_set is not None and self.n_classes and self.main_rank:
            if self.layout is None:
                metrics.update(compare_with_random_init(self.model.encoder, cfg.seed,
                                                        self.train_set, self.test_set,
                                                        self.device, cfg.final_probe_images))
            else:  # per view and on all views
                metrics.update(multiview.compare_with_random_init(
                    self.model, cfg, self.train_set, self.test_set, self.device,
                    cfg.final_probe_images))
        return metrics

    def _train_epoch(self, stop: StopOnSignal) -> bool:
        """The epoch's remaining steps; False if stopped (by a signal or the time limit) after
        saving a checkpoint. Between log points no step waits for the device. Every
        cfg.checkpoint_every minutes a checkpoint is written mid-epoch, as a stop writes it."""
        cfg = self.cfg
        self.model.train()
        start, images = time.perf_counter(), 0
        self.images_per_s = None  # no steps in this process (resumed at the epoch's end)
        if self.step_in_epoch >= self.steps_per_epoch:
            return True
        self.train_batches.set_epoch(self.epoch, self.step_in_epoch)
        bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, unit="step",
                   desc=f"epoch {self.epoch + 1}/{cfg.epochs}", disable=not self.main_rank,
                   mininterval=1.0, dynamic_ncols=True)
        with bar:
            for (x1, x2, *more_views), labels in self.train_batches:
                if self.step_in_epoch >= self.steps_per_epoch:
                    break
                lr = cfg.lr * lr_factor(self.step, self.steps_per_epoch, cfg)
                x1, x2, labels, *more_views = (x.to(self.device, non_blocking=True)
                                               for x in (x1, x2, labels, *more_views))
                self.sums.add(self.train_step(x1, x2, labels, lr, more_views))
                self.step_in_epoch, self.step = self.step_in_epoch + 1, self.step + 1
                images += len(labels) * self.world_size
                bar.update()
                log_point = (self.step % cfg.log_every == 0
                             or self.step_in_epoch == self.steps_per_epoch)
                if log_point:
                    self._log_progress(bar, images / (time.perf_counter() - start))
                if self._stop_now(stop, log_point):
                    self.save()
                    return False
                if self._checkpoint_due(log_point):
                    self.save()
        self.images_per_s = images / (time.perf_counter() - start)
        return True

    def _stop_now(self, stop: StopOnSignal, log_point: bool) -> bool:
        """Whether to stop now; with several processes all decide together, at log points."""
        if self.world_size == 1:
            return bool(stop.requested)
        if not log_point:
            return False
        flag = torch.tensor(float(bool(stop.requested)), device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return flag.item() > 0

    def _checkpoint_due(self, log_point: bool) -> bool:
        """Whether cfg.checkpoint_every minutes have passed since the last checkpoint (or the
        start); with several processes rank 0's clock decides, at log points."""
        if not self.cfg.checkpoint_every or (self.world_size > 1 and not log_point):
            return False
        due = time.perf_counter() - self.saved_at > 60 * self.cfg.checkpoint_every
        if self.world_size > 1:
            flag = [due]
            torch.distributed.broadcast_object_list(flag, src=0)
            due = flag[0]
        return due

    def _read_sums(self) -> tuple[dict[str, float], int]:
        """The epoch's sums so far and its skipped steps; stops on a non-finite loss unless
        cfg.skip_nonfinite (the skipped step changed no weight)."""
        values, skipped, bad = self.sums.read(self.world_size)
        if bad is None:
            return values, skipped
        step = self.step - self.step_in_epoch + bad["index"]
        message = (f"non-finite loss at step {step} (epoch {self.epoch + 1}): "
                   + ", ".join(f"{k}={bad[k]:.4g}" for k in NCE_TERMS + ("loss",)))
        if not self.cfg.skip_nonfinite:
            last = (f"the last good checkpoint is {self.path}" if self.path.exists()
                    else "no checkpoint was saved before it")
            raise TrainingError(f"{message}; {last}. Lower --lr, use --precision fp32, or pass "
                                "--skip-nonfinite to skip such batches")
        if skipped > self._skipped_seen:
            log.warning("%s; batch skipped (%d skipped in this epoch)", message, skipped)
        self._skipped_seen = skipped
        return values, skipped

    def _log_progress(self, bar: tqdm, images_per_s: float) -> None:
        values, _ = self._read_sums()
        steps = values["steps"]
        if not steps:  # every step so far skipped: no mean to show
            bar.set_postfix(loss="none (all skipped)", refresh=False)
            return
        bar.set_postfix(loss=f"{values['loss'] / steps:.3f}", img_s=f"{images_per_s:.0f}",
                        lin_acc=f"{values['correct_linear'] / max(values['n_labelled'], 1):.3f}",
                        refresh=False)
        if self.writer is not None:  # the epoch's running means
            for name in NCE_TERMS + ("loss",):
                self.writer.add_scalar(f"train/{name}", values[name] / steps, self.step)
            self.writer.add_scalar("train/lr", self.train_step.optimiser.param_groups[0]["lr"],
                                   self.step)

    def _end_epoch(self, stop: StopOnSignal) -> dict | None:
        """The epoch's metrics line (and test accuracy of the probes), then a checkpoint.
        None if a stop cut the test probes short: then the checkpoint is saved at the epoch's
        last step, and the resumed run tests and writes the line."""
        values, skipped = self._read_sums()
        steps = values["steps"]
        if not steps:  # no mean exists; the weights are whatever made every loss non-finite
            last = (f"the last good checkpoint is {self.path} (epoch {self.epoch})"
                    if self.path.exists() else "no checkpoint was saved before it")
            log.warning("every step of epoch %d was skipped (non-finite loss)", self.epoch + 1)
            raise TrainingError(
                f"all {skipped} steps of epoch {self.epoch + 1} had a non-finite loss and were "
                f"skipped: the model no longer trains; {last}, kept as it was. Lower --lr or "
                "use --precision fp32, and resume or start again")
        metrics = {"epoch": self.epoch + 1, "step": self.step,
                   "lr": self.train_step.optimiser.param_groups[0]["lr"],
                   **{k: values[k] / steps for k in LOSSES}}
        if self.images_per_s is not None:  # none when no step ran in this process
            metrics["images_per_s"] = self.images_per_s
        metrics["wall_s"] = time.perf_counter() - self.started  # this process, start-up in
        self.skipped_batches += skipped
        if self.skipped_batches:
            metrics["skipped_batches"] = self.skipped_batches
        bad_files = skipped_files(self.train_set) + (
            skipped_files(self.test_set) if self.test_set else [])
        if bad_files:  # unreadable images left out (each named in a warning)
            metrics["skipped_files"] = len(bad_files)
        if self.n_classes:
            labelled = max(values["n_labelled"], 1e-12)
            metrics["train_linear_acc"] = values["correct_linear"] / labelled
            metrics["train_mlp_acc"] = values["correct_mlp"] / labelled
        if self.test_batches is not None:
            try:
                with stop.immediate():  # eval mode, no step: nothing of it needs saving
                    metrics.update(probe_accuracy(self.model, self.test_batches, self.device,
                                                  autocast_for(self.cfg.precision, self.device)))
            except Stopped:
                self.model.train()
                self.save()
                return None
        if self.main_rank:
            for name, value in metrics.items():
                self.writer.add_scalar(f"epoch/{name}", value, self.epoch + 1)
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            log.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in metrics.items()))
        self.epoch, self.step_in_epoch, self._skipped_seen = self.epoch + 1, 0, 0
        self.sums = EpochSums(self.device)
        self.save()
        return metrics

    def save(self) -> None:
        """Write the checkpoint atomically (rank 0; every rank takes part)."""
        values, _ = self._read_sums()
        rng = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda"
               else None}
        rngs = [rng]
        if self.world_size > 1:
            rngs = [None] * self.world_size
            torch.distributed.all_gather_object(rngs, rng)
        if self.main_rank:
            model, step = self.model, self.train_step
            state = {
                "format": checkpoint.FORMAT, "config": self.cfg.to_dict(),
                "n_classes": self.n_classes, "encoder": model.encoder.state_dict(),
                "probes": model.probes.state_dict() if model.probes else None,
                "mixture_head": model.mixture_head.state_dict() if model.mixture_head else None,
                "optimizer": step.optimiser.state_dict(), "scaler": step.scaler.state_dict(),
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "step": self.step,
                "rng": rngs, "data_path": self.data_path, "views": self.layout,
                "data_fingerprint": self.fingerprint,
                "epoch_sums": torch.tensor(list(values.values()), dtype=torch.float64),
                "skipped_batches": self.skipped_batches}
            try:
                checkpoint.save_atomic(state, self.path)
            except (OSError, RuntimeError) as error:  # a full disk: torch raises either
                # save_atomic left the old file intact
                reason = (error.strerror if isinstance(error, OSError) and error.strerror
                          else str(error).strip().splitlines()[0] if str(error).strip()
                          else type(error).__name__)
                kept = ("the previous checkpoint there is kept" if self.path.exists()
                        else "no checkpoint was saved before")
                raise TrainingError(
                    f"could not write the checkpoint {self.path} ({reason}); {kept}. Free some "
                    "space and run the same command to resume.") from None
        if self.world_size > 1:
            torch.distributed.barrier()
        self.saved_at = time.perf_counter()
