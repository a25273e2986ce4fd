"""Interrupted, killed, diverging and starved runs lose nothing and explain themselves."""
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from amdim.cli import main
from amdim.config import preset
from amdim.training import checkpoint
from amdim.training.pretraining import TrainingError, pretrain

TINY = dict(ndf=8, n_rkhs=64, n_depth=1, batch_size=16, steps_per_epoch=3, warmup_steps=4,
            workers=0, final_probe=False, device="cpu")


def tiny(run_dir, **overrides):
    return preset("digits", run_dir=str(run_dir), **{**TINY, **overrides})


def run_and_interrupt(run_dir, at_step: int, how: str, epochs: int = 3, **extra):
    """Run pretraining in a subprocess that receives `how` (SIGINT, SIGTERM, SIGKILL) just
    before optimiser step `at_step`."""
    script = textwrap.dedent(f"""
        import os, signal
        import amdim.training.pretraining as train
        from amdim.config import preset
        lr_factor = train.lr_factor
        def hook(step, *args):
            if step == {at_step}:
                os.kill(os.getpid(), signal.{how})
            return lr_factor(step, *args)
        train.lr_factor = hook
        print(train.pretrain(preset("digits", run_dir={str(run_dir)!r}, epochs={epochs}, **{ {**TINY, **extra}!r})))
    """)
    # same thread count as this process: CPU results are bit-exact only for equal threading
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env=env)


def assert_same_weights(path_a, path_b):
    a, b = checkpoint.load(path_a), checkpoint.load(path_b)
    assert a["step"] == b["step"]
    for part in ("encoder", "probes"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 3-epoch run to compare resumed runs with."""
    run_dir = tmp_path_factory.mktemp("straight")
    pretrain(tiny(run_dir, epochs=3))
    return run_dir / "checkpoint.pt"


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
def test_signal_saves_at_step_boundary_and_resumes_exactly(tmp_path, straight, how):
    done = run_and_interrupt(tmp_path, at_step=4, how=how)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{how} received" in done.stderr
    state = checkpoint.load(tmp_path / "checkpoint.pt")
    assert (state["epoch"], state["step_in_epoch"], state["step"]) == (1, 2, 5)  # mid-epoch
    pretrain(tiny(tmp_path, epochs=3))
    assert_same_weights(tmp_path / "checkpoint.pt", straight)


def test_kill_9_loses_only_work_since_last_checkpoint(tmp_path, straight):
    done = run_and_interrupt(tmp_path, at_step=5, how="SIGKILL")
    assert done.returncode == -signal.SIGKILL
    state = checkpoint.load(tmp_path / "checkpoint.pt")
    assert (state["epoch"], state["step"]) == (1, 3)  # the end-of-epoch-1 checkpoint
    pretrain(tiny(tmp_path, epochs=3))
    assert_same_weights(tmp_path / "checkpoint.pt", straight)


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal
        import amdim.training.checkpoint as checkpoint
        import amdim.training.pretraining as train
        from amdim.config import preset
        calls, save = [], checkpoint.torch.save
        def dying_save(state, f):
            calls.append(1)
            if len(calls) == 2:  # the second checkpoint: die half-way through the write
                f.write(b"PK\\x03\\x04 half a checkpoint")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            save(state, f)
        checkpoint.torch.save = dying_save
        train.pretrain(preset("digits", run_dir={str(tmp_path)!r}, epochs=3, **{TINY!r}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert done.returncode == -signal.SIGKILL
    assert checkpoint.load(tmp_path / "checkpoint.pt")["epoch"] == 1
    metrics = pretrain(tiny(tmp_path, epochs=2))  # resumes from the intact checkpoint
    assert metrics["epoch"] == 2
    # epoch 2's metrics line was written before the crash; the retrained epoch replaces it
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_full_disk_keeps_previous_checkpoint(tmp_path, monkeypatch):
    calls, save = [], checkpoint.torch.save

    def full_disk(state, f):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        save(state, f)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(TrainingError, match="No space left on device.*previous checkpoint there is kept"):
        pretrain(tiny(tmp_path, epochs=2))
    assert checkpoint.load(tmp_path / "checkpoint.pt")["epoch"] == 1
    assert not list(tmp_path.glob("*.tmp"))


def nan_after(calls: int, monkeypatch):
    import amdim.model.amdim

    real, count = amdim.model.amdim.multiscale_nce, []

    def sometimes_nan(*args, **kwargs):
        count.append(1)
        losses = real(*args, **kwargs)
        if len(count) == calls:
            losses["loss_1t5"] = losses["loss_1t5"] * float("nan")
        return losses

    monkeypatch.setattr(amdim.model.amdim, "multiscale_nce", sometimes_nan)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    nan_after(5, monkeypatch)  # the 5th step is step 4, in epoch 2
    with pytest.raises(TrainingError, match="non-finite loss at step 4 .epoch 2.*loss_1t5=nan"):
        pretrain(tiny(tmp_path, epochs=3))
    state = checkpoint.load(tmp_path / "checkpoint.pt")
    assert state["step"] == 3
    assert all(torch.isfinite(v).all() for v in state["encoder"].values() if v.is_floating_point())


def test_non_finite_batch_can_be_skipped(tmp_path, monkeypatch):
    nan_after(5, monkeypatch)
    metrics = pretrain(tiny(tmp_path, epochs=3, skip_nonfinite=True))
    assert metrics["epoch"] == 3 and metrics["skipped_batches"] == 1
    state = checkpoint.load(tmp_path / "checkpoint.pt")
    assert all(torch.isfinite(v).all() for v in state["encoder"].values() if v.is_floating_point())


def test_out_of_memory_suggests_a_smaller_batch(tmp_path, monkeypatch):
    import amdim.model.amdim

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(amdim.model.amdim.AMDIM, "forward", out_of_memory)
    with pytest.raises(SystemExit, match="out of GPU memory with batch_size 16: lower --batch-size .e.g. --batch-size 8"):
        main(["pretrain", "--ndf", "8", "--n-rkhs", "64", "--batch-size", "16", "--workers", "0",
              "--run-dir", str(tmp_path)])


@pytest.mark.parametrize("flags, message", [
    (["--image-size", "48"], "image_size 48 has no AMDIM encoder"),
    (["--batch-size", "1"], "batch_size must be at least 2"),
    (["--ndf", "64", "--n-rkhs", "128"], "raise n_rkhs to at least 256"),
    (["--data", "/nonexistent/folder"], "nor an existing folder"),
])
def test_impossible_settings_are_rejected_at_start(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        main(["pretrain", "--run-dir", str(tmp_path), *flags])


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for label in ("a", "b"):
            folder = tmp_path / "data" / split / label
            folder.mkdir(parents=True)
            for i in range(12):
                colour = (40 * i % 255, 200 if label == "a" else 30, 90)
                Image.new("RGB", (32, 32), colour).save(folder / f"{i}.png")
    (tmp_path / "data" / "train" / "a" / "broken.jpg").write_text("not an image")
    metrics = pretrain(tiny(tmp_path / "run", data=str(tmp_path / "data"), epochs=1,
                            batch_size=8, steps_per_epoch=2))
    assert metrics["skipped_files"] == 1
    with pytest.raises(SystemExit, match="broken.jpg"):
        main(["pretrain", "--data", str(tmp_path / "data"), "--strict-data", "--run-dir",
              str(tmp_path / "strict")])


# -- issue 17: locked run folders, exit codes, and every bad setting refused


def test_a_second_run_into_the_same_folder_is_refused_naming_the_holder(tmp_path):
    import socket

    from amdim.training.run_folder import locked

    with locked(tmp_path):
        done = subprocess.run(
            [sys.executable, "-m", "amdim", "pretrain", "--run-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=120)
        assert done.returncode == 1 and "Traceback" not in done.stderr
        assert f"in use by another run (pid {os.getpid()} on {socket.gethostname()})" in done.stderr
    assert not (tmp_path / "checkpoint.pt").exists()
    pretrain(tiny(tmp_path, epochs=1))  # the lock went with its holder


def test_kill_9_leaves_no_stale_lock(tmp_path):
    done = run_and_interrupt(tmp_path, at_step=1, how="SIGKILL")
    assert done.returncode == -signal.SIGKILL and (tmp_path / "lock").exists()
    assert pretrain(tiny(tmp_path, epochs=1))["epoch"] == 1


def test_metrics_without_a_checkpoint_are_kept_under_a_new_name(tmp_path, caplog):
    pretrain(tiny(tmp_path, epochs=1))
    old_metrics = (tmp_path / "metrics.jsonl").read_text()
    (tmp_path / "checkpoint.pt").rename(tmp_path / "elsewhere.pt")
    with caplog.at_level("WARNING", logger="amdim"):
        pretrain(tiny(tmp_path, epochs=1, seed=1))
    assert "the old metrics.jsonl and config.json are kept" in caplog.text
    kept = list(tmp_path.glob("metrics.jsonl.before-*"))
    assert len(kept) == 1 and kept[0].read_text() == old_metrics
    assert len(list(tmp_path.glob("config.json.before-*"))) == 1
    assert json.loads((tmp_path / "config.json").read_text())["seed"] == 1


@pytest.mark.parametrize("stopped, code", [("SIGINT", 130), ("SIGTERM", 143),
                                           ("time limit", 75)])
def test_a_stopped_run_exits_with_its_documented_code(tmp_path, monkeypatch, stopped, code):
    import amdim.training.pretrain_command

    monkeypatch.setattr(amdim.training.pretrain_command, "pretrain",
                        lambda cfg: {"stopped": stopped, "step": 1})
    with pytest.raises(SystemExit) as exit:
        main(["pretrain", "--run-dir", str(tmp_path)])
    assert exit.value.code == code


def test_time_limit_exits_75_and_resumes(tmp_path):
    flags = ["pretrain", "--run-dir", str(tmp_path), "--ndf", "8", "--n-rkhs", "64",
             "--batch-size", "16", "--steps-per-epoch", "2", "--epochs", "1", "--workers", "0",
             "--no-final-probe"]
    with pytest.raises(SystemExit) as exit:  # reached in start-up: stops there
        main(flags + ["--time-limit", "1e-9"])
    assert exit.value.code == 75 and not (tmp_path / "checkpoint.pt").exists()
    main(flags)  # finished: returns, exit status 0
    assert checkpoint.load(tmp_path / "checkpoint.pt")["epoch"] == 1
    with pytest.raises(SystemExit) as exit:  # reached while training: saved, then stopped
        main(flags[:2] + [str(tmp_path / "b")] + flags[3:] + ["--epochs", "5000",
                                                              "--time-limit", "0.1"])
    assert exit.value.code == 75
    assert 1 <= checkpoint.load(tmp_path / "b" / "checkpoint.pt")["step"] < 10_000


def test_run_folders_that_cannot_be_written_are_explained(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="cannot use .*file as the run folder"):
        main(["pretrain", "--run-dir", str(tmp_path / "file")])

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EROFS, "Read-only file system", str(tmp_path / "config.json"))

    import pathlib
    monkeypatch.setattr(pathlib.Path, "write_text", read_only)
    with pytest.raises(SystemExit, match="amdim pretrain: .*config.json: Read-only file system"):
        main(["pretrain", "--run-dir", str(tmp_path / "run"), "--ndf", "8", "--n-rkhs", "64"])


@pytest.mark.parametrize("flags, message", [
    (["--log-every", "0"], "log_every must be >= 1"),
    (["--lr-gamma", "-0.2"], r"lr_gamma must be > 0 \(e.g. 0.2\), got -0.2"),
    (["--tclip", "0"], "tclip must be > 0"),
    (["--adam-eps", "0"], "adam_eps must be > 0"),
    (["--time-limit", "-1"], "time_limit must be >= 0 minutes"),
    (["--device", "gpu"], r"'gpu' is not a device \(a GPU is cuda\)"),
])
def test_bad_settings_are_refused_with_the_accepted_range(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        main(["pretrain", "--run-dir", str(tmp_path), *flags])


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "1"], "batch_size must be at least 2"),
    (["--steps", "0"], "--steps must be >= 1"),
])
def test_benchmark_refuses_bad_settings(flags, message):
    with pytest.raises(SystemExit, match=message):
        main(["benchmark", "--device", "cpu", *flags])


def test_non_finite_loss_at_step_0_says_there_is_no_checkpoint(tmp_path, monkeypatch):
    nan_after(1, monkeypatch)
    with pytest.raises(TrainingError, match="non-finite loss at step 0 .*no checkpoint was saved"):
        pretrain(tiny(tmp_path, epochs=1))
    assert not (tmp_path / "checkpoint.pt").exists()


def test_out_of_cpu_memory_is_explained(tmp_path, monkeypatch):
    import amdim.model.amdim

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
                           "can't allocate memory: you tried to allocate 140737488355328 bytes.")

    monkeypatch.setattr(amdim.model.amdim.AMDIM, "forward", out_of_memory)
    with pytest.raises(SystemExit, match="out of CPU memory .RAM. with batch_size 16 and ndf 8: "
                       "lower --batch-size .e.g. --batch-size 8.*no checkpoint had been saved"):
        main(["pretrain", "--ndf", "8", "--n-rkhs", "64", "--batch-size", "16", "--workers", "0",
              "--run-dir", str(tmp_path)])


@pytest.mark.parametrize("size, cuda, chosen", [
    (32, False, "cifar-cpu"), (64, False, "imagenette-cpu"), (128, False, "imagenette-cpu"),
    (32, True, "cifar-small"), (96, True, "stl10"), (128, True, "imagenet-small")])
def test_data_without_a_preset_gets_one_that_fits(tmp_path, monkeypatch, size, cuda, chosen):
    import argparse

    from PIL import Image

    import amdim.training.pretrain_command
    from amdim.config import add_config_flags
    from amdim.training.pretrain_command import config_from_args

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (size, size)).save(folder / "0.png")
    monkeypatch.setattr(amdim.training.pretrain_command, "resolve_device",
                        lambda name: torch.device("cuda" if cuda else "cpu"))
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset")
    add_config_flags(parser)
    args = parser.parse_args(["--data", str(folder), "--epochs", "3"])
    cfg = config_from_args(args)
    assert args.preset_chosen[0] == chosen and cfg.epochs == 3
    assert cfg.lr == preset(chosen).lr and cfg.data == str(folder)
    args = parser.parse_args([])
    assert config_from_args(args) == preset("digits") and args.preset_chosen == ("digits", None)


def test_help_and_start_up_show_the_settings_in_effect(tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # one line per flag
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default digits 6; cifar-cpu 30;" in text  # --epochs, preset by preset
    assert "75 by --time-limit" in text
    with caplog.at_level("INFO", logger="amdim"):
        main(["pretrain", "--data", "digits", "--run-dir", str(tmp_path), "--ndf", "8",
              "--n-rkhs", "64", "--steps-per-epoch", "1", "--epochs", "1", "--workers", "0",
              "--no-final-probe"])
    assert "preset digits; in effect: data digits, image_size 32, ndf 8" in caplog.text


def test_the_final_probe_fits_a_sample_of_the_training_set(tmp_path, monkeypatch):
    import amdim.model.frozen_features

    sizes = []
    monkeypatch.setattr(amdim.model.frozen_features, "linear_probe_accuracy",
                        lambda encoder, train, test, device: sizes.append(len(train)) or 0.5)
    pretrain(tiny(tmp_path, epochs=1, final_probe=True, final_probe_images=100))
    assert sizes == [100, 100]
