"""The run folder of `amdim pretrain`: its lock, its files, and the rules for resuming it.

A run folder holds config.json, metrics.jsonl, TensorBoard events and checkpoint.pt. One run
at a time writes into it (an flock that dies with the process); rerunning the same command
resumes the run, and a command whose settings would change the run is refused.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from ..config import PretrainConfig
from ..data.datasets import resolved_data
from ..runtime import CHECKPOINT, LOCK

log = logging.getLogger("amdim")
# exit status of `amdim pretrain` when stopped early (the run resumes from its checkpoint)
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143, "time limit": 75}  # 75: EX_TEMPFAIL
# settings a resumed run may change; every other field must equal the saved run's
RESUMABLE = {"epochs", "workers", "threads", "device", "run_dir", "data_root", "download",
             "log_every", "final_probe", "skip_nonfinite", "strict_data", "data_path", "compile",
             "time_limit", "channels_last", "final_probe_images", "checkpoint_every",
             "eval_batch_size"}


class TrainingError(RuntimeError):
    """A run that cannot start or go on, with what to do about it."""


class Stopped(BaseException):
    """A phase cut short by a stop request (SIGINT, SIGTERM or the time limit); a
    BaseException, so that no `except Exception` on the way swallows it."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class StopOnSignal:
    """SIGINT, SIGTERM and the time limit (cfg.time_limit minutes, a SIGALRM) set `requested`.
    Inside `deferred()` (the training steps, a checkpoint's write) the run stops at the next
    safe point, after saving; in every other phase (data caching, test probes, the final probe)
    nothing is lost by stopping at once, so the signal raises Stopped there and then. A second
    SIGINT interrupts at once (KeyboardInterrupt)."""

    def __init__(self, time_limit: float = 0.0):
        self.requested: str | None = None
        self._deferred, self._time_limit = 0, time_limit

    def _handle(self, number, frame):
        if self.requested and number == signal.SIGINT:
            raise KeyboardInterrupt
        reason = "time limit" if number == signal.SIGALRM else signal.Signals(number).name
        self.requested = self.requested or reason
        if not self._deferred:
            raise Stopped(self.requested)
        log.warning("%s: saving a checkpoint at the end of this step", reason if reason ==
                    "time limit" else f"{reason} received")

    @contextmanager
    def deferred(self):
        """Signals only set `requested` inside (the caller stops at its next safe point)."""
        self._deferred += 1
        try:
            yield self
        finally:
            self._deferred -= 1

    @contextmanager
    def immediate(self):
        """A phase inside deferred() that may stop at once (raises Stopped)."""
        saved, self._deferred = self._deferred, 0
        try:
            if self.requested:
                raise Stopped(self.requested)
            yield self
        finally:
            self._deferred = saved

    def __enter__(self):
        numbers = (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)
        self._previous = {s: signal.signal(s, self._handle) for s in numbers}
        if self._time_limit:  # minutes from now (the run's start)
            signal.setitimer(signal.ITIMER_REAL, 60 * self._time_limit)
        return self

    def __exit__(self, *exc):
        signal.setitimer(signal.ITIMER_REAL, 0)
        for number, handler in self._previous.items():
            signal.signal(number, handler)


class EventLog:
    """The run's TensorBoard events (SummaryWriter). A write that fails (a full disk), in
    the writer's thread or here, is one warning, and the run goes on without events."""

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir, self._previous_hook, self.failed = run_dir, threading.excepthook, False
        threading.excepthook = self._thread_failed  # else the writer's thread prints a traceback
        self.writer = None
        try:
            writer = SummaryWriter(str(run_dir))  # writes its first event at once
            self.writer = None if self.failed else writer
        except OSError as error:  # the thread's error, raised again here
            self._failed(error)

    def _thread_failed(self, args) -> None:
        if type(args.thread).__name__ == "_AsyncWriterThread":
            self._failed(args.exc_value)
        else:
            self._previous_hook(args)

    def _failed(self, error: BaseException) -> None:
        if not self.failed:
            self.failed, self.writer = True, None
            reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
            log.warning("cannot write TensorBoard events in %s (%s): training goes on without "
                        "them (metrics.jsonl and the checkpoint are written as before); free "
                        "some space for the next run's events", self.run_dir, reason)

    def add_scalar(self, *args) -> None:
        if self.writer is not None:
            try:
                self.writer.add_scalar(*args)
            except Exception as error:  # the thread's error, raised again here
                self._failed(error)

    def close(self) -> None:
        try:
            if self.writer is not None:
                self.writer.close()
        except Exception as error:
            self._failed(error)
        finally:
            threading.excepthook = self._previous_hook


def check_same_run(saved: dict, cfg: PretrainConfig, path: Path) -> None:
    """Refuse to resume a run whose saved settings differ from cfg (but for RESUMABLE ones);
    a field the saved run predates counts as its default."""
    current = cfg.to_dict()
    saved = {**PretrainConfig().to_dict(), **saved}
    if "data" in saved:  # older runs saved the path as typed, relative to where they ran
        saved = {**saved, "data": resolved_data(saved["data"])}
    diffs = [f"{k}: saved {saved.get(k)!r}, requested {current[k]!r}" for k in current
             if k not in RESUMABLE and _plain(saved.get(k)) != _plain(current[k])]
    if diffs:
        raise TrainingError(
            f"{path} holds a run with other settings ({'; '.join(diffs)}). Resume it with the "
            "same settings, or start a new run with another --run-dir.")


def _plain(value):
    return list(value) if isinstance(value, (tuple, list)) else value


@contextmanager
def explain_out_of_memory(cfg: PretrainConfig, path: Path):
    kept = (f"the last checkpoint {path} is kept and the run resumes from it" if path.exists()
            else "no checkpoint had been saved yet")
    smaller = f"lower --batch-size (e.g. --batch-size {max(2, cfg.batch_size // 2)})"
    try:
        yield
    except torch.OutOfMemoryError:
        raise TrainingError(f"out of GPU memory with batch_size {cfg.batch_size}: {smaller}, "
                            f"use --precision bf16, or a smaller model; {kept}") from None
    except (RuntimeError, MemoryError) as error:  # the CPU allocator raises a RuntimeError
        if not isinstance(error, MemoryError) and "can't allocate memory" not in str(error):
            raise
        raise TrainingError(
            f"out of CPU memory (RAM) with batch_size {cfg.batch_size} and ndf {cfg.ndf}: "
            f"{smaller} or use a smaller model (--ndf, --n-rkhs, --n-depth); {kept}") from None


@contextmanager
def locked(run_dir: Path):
    """Hold an exclusive lock on the run folder (created if missing) while the run lives:
    flock on run_dir/lock, released by the OS when the process ends however it ends, so a
    kill -9 leaves no stale lock. On NFS, Linux takes it as a POSIX lock on the server;
    where the filesystem has no locks at all, a warning says the folder is unprotected."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        file = open(run_dir / LOCK, "a+")
    except OSError as error:  # a file in the way, a read-only folder, no permission
        raise TrainingError(f"cannot use {run_dir} as the run folder ({error.strerror or error}); "
                            "pass a writable folder as --run-dir") from None
    with file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "another process"
            raise TrainingError(f"{run_dir} is in use by another run ({holder}); wait for it to "
                                "end or stop it, or pass another --run-dir") from None
        except OSError as error:  # ENOLCK, EOPNOTSUPP: a filesystem without locks
            log.warning("cannot lock %s (%s): nothing stops a second run writing into it",
                        run_dir, error.strerror or error)
        file.seek(0)
        file.truncate()
        file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        file.flush()
        yield


def keep_files_of_lost_run(run_dir: Path) -> None:
    """A folder with metrics but no checkpoint (moved away, or a crash before the first was
    saved): keep its metrics.jsonl and config.json under new names rather than overwrite."""
    metrics = run_dir / "metrics.jsonl"
    if (run_dir / CHECKPOINT).exists() or not metrics.exists() or metrics.stat().st_size == 0:
        return
    suffix = time.strftime(".before-%Y%m%d-%H%M%S")
    for path in (metrics, run_dir / "config.json"):
        if path.exists():
            path.rename(path.with_name(path.name + suffix))
    log.warning("%s holds metrics.jsonl but no %s: starting a new run there; the old "
                "metrics.jsonl and config.json are kept with the suffix %s", run_dir,
                CHECKPOINT, suffix)


def keep_metrics_until(path: Path, epoch: int) -> dict:
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
