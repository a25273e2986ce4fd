"""Every phase of a run stops within moments and says so; metrics never invent a mean; a
storage error or a foreign file is one line, the previous checkpoint intact (issue 24)."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import amdim.training.pretraining as training
from amdim.cli import main
from amdim.training import checkpoint
from amdim.training.pretraining import TrainingError, pretrain

from .test_reliability import (assert_same_weights, run_and_interrupt, straight,  # noqa: F401
                               tiny)


def lines(run_dir):
    """metrics.jsonl without the timings (they differ between runs)."""
    return [{k: v for k, v in json.loads(line).items() if k not in ("images_per_s", "wall_s")}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sigterm_in_the_test_probes_stops_at_once_and_resumes_the_same(tmp_path, monkeypatch):
    probe = training.probe_accuracy
    calls, sent = [], []

    def slow_probes(*args):  # the probes of epoch 2 get SIGTERM, then would take 20 s
        calls.append(1)
        if len(calls) == 2:
            sent.append(time.perf_counter())
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(2000):
                time.sleep(0.01)
        return probe(*args)

    monkeypatch.setattr(training, "probe_accuracy", slow_probes)
    result = pretrain(tiny(tmp_path / "a", epochs=3))
    assert result["stopped"] == "SIGTERM" and time.perf_counter() - sent[0] < 10
    state = checkpoint.load(tmp_path / "a" / "checkpoint.pt")
    assert (state["epoch"], state["step_in_epoch"]) == (1, 3)  # at the epoch's last step
    assert len(lines(tmp_path / "a")) == 1  # epoch 2's line not written yet
    monkeypatch.setattr(training, "probe_accuracy", probe)
    pretrain(tiny(tmp_path / "a", epochs=3))
    resumed = [json.loads(line)
               for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert "images_per_s" not in resumed[1]  # no step ran in that process: no rate, not 0
    pretrain(tiny(tmp_path / "b", epochs=3))
    assert lines(tmp_path / "a") == lines(tmp_path / "b")
    assert_same_weights(tmp_path / "a" / "checkpoint.pt", tmp_path / "b" / "checkpoint.pt")


def test_sigterm_in_the_last_save_stops_before_the_final_probe(tmp_path, monkeypatch):
    import amdim.model.frozen_features

    probed, save = [], checkpoint.save_atomic
    monkeypatch.setattr(amdim.model.frozen_features, "linear_probe_accuracy",
                        lambda *args: probed.append(1) or 0.5)

    def save_then_term(state, path):
        if state["epoch"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        save(state, path)

    monkeypatch.setattr(checkpoint, "save_atomic", save_then_term)
    flags = ["pretrain", "--run-dir", str(tmp_path), "--ndf", "8", "--n-rkhs", "64",
             "--batch-size", "16", "--steps-per-epoch", "2", "--epochs", "2", "--workers", "0",
             "--final-probe", "--final-probe-images", "64"]
    with pytest.raises(SystemExit) as exit:
        main(flags)
    assert exit.value.code == 143 and not probed
    assert checkpoint.load(tmp_path / "checkpoint.pt")["epoch"] == 2
    monkeypatch.setattr(checkpoint, "save_atomic", save)
    main(flags)
    assert probed  # the rerun finishes with the final probe


def test_a_stop_in_the_final_probe_is_immediate(tmp_path, monkeypatch):
    import amdim.model.frozen_features

    sent = []

    def slow_probe(*args):
        sent.append(time.perf_counter())
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(20)
        return 0.5

    monkeypatch.setattr(amdim.model.frozen_features, "linear_probe_accuracy", slow_probe)
    result = pretrain(tiny(tmp_path, epochs=1, steps_per_epoch=1, final_probe=True))
    assert result == {"stopped": "SIGINT"} and time.perf_counter() - sent[0] < 10


def test_ctrl_c_in_start_up_imports_exits_130(monkeypatch):
    import importlib

    def interrupted(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib, "import_module", interrupted)
    with pytest.raises(SystemExit) as exit:
        main(["pretrain"])
    assert exit.value.code == 130
    light = subprocess.run([sys.executable, "-c",
                            "import sys, amdim.cli; print('torch' in sys.modules)"],
                           capture_output=True, text=True)
    assert light.stdout.strip() == "False"  # nothing heavy before main() can catch Ctrl-C


def test_sigterm_in_any_command_exits_143(monkeypatch):
    import amdim.training.benchmark

    sent = []

    def terminated(args):
        sent.append(time.perf_counter())
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(20)

    monkeypatch.setattr(amdim.training.benchmark, "run", terminated)
    with pytest.raises(SystemExit) as exit:
        main(["benchmark", "--device", "cpu"])
    assert exit.value.code == 143 and time.perf_counter() - sent[0] < 10


def test_the_test_probes_use_the_evaluation_batch(tmp_path, monkeypatch):
    sizes, probe = [], training.probe_accuracy

    def recorded(model, batches, *args):
        sizes.extend(len(labels) for _, labels in batches)
        return probe(model, batches, *args)

    monkeypatch.setattr(training, "probe_accuracy", recorded)
    pretrain(tiny(tmp_path, epochs=1, steps_per_epoch=1, batch_size=8, eval_batch_size=100))
    assert max(sizes) == 100


def test_an_epoch_of_skipped_steps_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import amdim.model.amdim

    real, count = amdim.model.amdim.multiscale_nce, []

    def nan_from_step_3(*args, **kwargs):
        count.append(1)
        losses = real(*args, **kwargs)
        if len(count) > 3:
            losses["loss_1t5"] = losses["loss_1t5"] * float("nan")
        return losses

    monkeypatch.setattr(amdim.model.amdim, "multiscale_nce", nan_from_step_3)
    with pytest.raises(TrainingError, match="all 3 steps of epoch 2 had a non-finite loss"):
        pretrain(tiny(tmp_path, epochs=3, skip_nonfinite=True))
    assert checkpoint.load(tmp_path / "checkpoint.pt")["epoch"] == 1
    assert [line["epoch"] for line in lines(tmp_path)] == [1]  # no line with loss=0


def test_full_disk_raised_by_torch_is_one_line(tmp_path, monkeypatch):
    calls, save = [], checkpoint.torch.save

    def full_disk(state, f):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")
        save(state, f)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(TrainingError, match=r"could not write the checkpoint .*checkpoint.pt "
                       r"\(\[enforce fail.*previous checkpoint there is kept"):
        pretrain(tiny(tmp_path, epochs=2))
    assert checkpoint.load(tmp_path / "checkpoint.pt")["epoch"] == 1
    assert not list(tmp_path.glob("*.tmp"))


def test_events_that_cannot_be_written_are_one_warning(tmp_path, monkeypatch, capsys, caplog):
    from tensorboard.summary.writer import record_writer

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(record_writer.RecordWriter, "write", full)
    with caplog.at_level("WARNING", logger="amdim"):
        metrics = pretrain(tiny(tmp_path, epochs=2))
    assert metrics["epoch"] == 2 and "cannot write TensorBoard events" in caplog.text
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("foreign", ["export", "authors"])
def test_a_foreign_checkpoint_in_the_run_folder_is_named(tmp_path, foreign):
    state = ({"format": checkpoint.ENCODER_FORMAT, "config": {}, "encoder": {}}
             if foreign == "export" else {"model": {}, "hyperparams": {}})
    checkpoint.save_atomic(state, tmp_path / "checkpoint.pt")
    with pytest.raises(TrainingError, match="checkpoint.pt is .*(exported|authors').*move it out"):
        pretrain(tiny(tmp_path, epochs=1))
    assert checkpoint.load(tmp_path / "checkpoint.pt")["digest"]  # left as it was


def test_benchmark_out_of_memory_and_unwritable_out_are_one_line(tmp_path, monkeypatch, capsys):
    import amdim.training.benchmark

    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="file is a file, not a folder"):
        main(["benchmark", "--device", "cpu", "--out", str(tmp_path / "file" / "b.json")])

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(amdim.training.benchmark, "benchmark", out_of_memory)
    with pytest.raises(SystemExit, match="out of GPU memory with batch size 32: lower"):
        main(["benchmark", "--device", "cpu", "--batch-size", "32"])


def test_checkpoints_every_few_minutes_resume_exactly_after_kill_9(tmp_path, straight):
    done = run_and_interrupt(tmp_path, at_step=5, how="SIGKILL", checkpoint_every=1e-9)
    assert done.returncode == -signal.SIGKILL
    state = checkpoint.load(tmp_path / "checkpoint.pt")
    assert (state["epoch"], state["step_in_epoch"], state["step"]) == (1, 2, 5)  # mid-epoch
    pretrain(tiny(tmp_path, epochs=3))
    assert_same_weights(tmp_path / "checkpoint.pt", straight)


def test_a_second_ctrl_c_is_one_line_and_130(tmp_path, monkeypatch, capsys):
    import amdim.training.pretrain_command

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(amdim.training.pretrain_command, "pretrain", interrupted)
    with pytest.raises(SystemExit) as exit:
        main(["pretrain", "--run-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit.value.code == 130 and "interrupted at once (a second Ctrl-C)" in err
    assert "Traceback" not in err


def test_loader_workers_stopped_by_the_signal_end_the_run_as_a_stop(tmp_path, monkeypatch):
    def killed(self, stop):
        raise RuntimeError("DataLoader worker (pid 123) is killed by signal: Terminated. ")

    monkeypatch.setattr(training.Pretraining, "run", killed)
    assert pretrain(tiny(tmp_path, epochs=1)) == {"stopped": "SIGTERM"}



class _SignalDispositions(torch.utils.data.Dataset):
    """Items that say whether the process building them ignores SIGTERM and SIGINT."""

    def __len__(self):
        return 8

    def __getitem__(self, index):
        ignored = [signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGTERM, signal.SIGINT)]
        return (torch.tensor(ignored), torch.tensor(ignored)), index


def test_loader_workers_leave_the_stop_signals_to_the_main_process(tmp_path):
    """SLURM's --signal=TERM reaches the workers too: they ignore it, so the main process
    stops at its step's end and saves there instead of losing the steps since a checkpoint."""
    from amdim.data.batches import LoaderBatches

    batches = LoaderBatches(_SignalDispositions(), tiny(tmp_path, batch_size=4, workers=1),
                            torch.device("cpu"), rank=0, world_size=1)
    (ignored, _), _ = next(iter(batches))
    assert ignored.all()  # in the worker
    assert signal.getsignal(signal.SIGTERM) != signal.SIG_IGN  # and not in this process
