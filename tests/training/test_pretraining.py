import json

import pytest
import torch

from amdim.cli import main
from amdim.config import preset
from amdim.data.batches import EpochBatches
from amdim.training import checkpoint
from amdim.training.pretraining import TrainingError, lr_factor, pretrain

TINY = dict(ndf=8, n_rkhs=64, n_depth=1, batch_size=16, steps_per_epoch=3, warmup_steps=4,
            workers=0, final_probe=False, device="cpu")

TIMINGS = ("images_per_s", "wall_s")  # what differs between equal runs

def tiny(run_dir, **overrides):
    return preset("digits", run_dir=str(run_dir), **{**TINY, **overrides})


def test_run_folder_has_everything(tmp_path):
    metrics = pretrain(tiny(tmp_path, epochs=2))
    assert metrics["epoch"] == 2 and metrics["step"] == 6
    assert 0 <= metrics["test_linear_acc"] <= 1 and 0 <= metrics["test_mlp_acc"] <= 1
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    for key in ("loss_1t5", "loss_1t7", "loss_5t5", "score_reg", "loss", "images_per_s"):
        assert key in lines[-1]
    assert json.loads((tmp_path / "config.json").read_text())["ndf"] == 8
    assert list(tmp_path.glob("events.out.tfevents.*"))
    state = checkpoint.load(tmp_path / "checkpoint.pt")
    assert state["epoch"] == 2 and state["step"] == 6 and state["n_classes"] == 10
    encoder = checkpoint.load_encoder(tmp_path / "checkpoint.pt")
    assert encoder.global_features(torch.randn(2, 3, 32, 32)).shape == (2, 64)


@pytest.mark.parametrize("data_path", ["loader", "device", "sharded"])
def test_resumed_run_equals_uninterrupted_run(tmp_path, data_path):
    pretrain(tiny(tmp_path / "straight", epochs=3, data_path=data_path))
    pretrain(tiny(tmp_path / "resumed", epochs=1, data_path=data_path))
    # same command, more epochs: resumes (on the data path it started with)
    pretrain(tiny(tmp_path / "resumed", epochs=3, data_path="auto"))
    a = checkpoint.load(tmp_path / "straight" / "checkpoint.pt")
    b = checkpoint.load(tmp_path / "resumed" / "checkpoint.pt")
    assert a["data_path"] == b["data_path"] == data_path
    for part in ("encoder", "probes"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), (part, key)
    assert a["step"] == b["step"] == 9
    torch.testing.assert_close(a["optimizer"]["state"], b["optimizer"]["state"], rtol=0, atol=0)
    lines = [(tmp_path / r / "metrics.jsonl").read_text().splitlines() for r in ("straight", "resumed")]
    drop = lambda line: {k: v for k, v in json.loads(line).items() if k not in TIMINGS}
    assert [drop(x) for x in lines[0]] == [drop(x) for x in lines[1]]


def test_resume_with_other_settings_is_refused(tmp_path):
    pretrain(tiny(tmp_path, epochs=1))
    with pytest.raises(TrainingError, match="ndf: saved 8, requested 16"):
        pretrain(tiny(tmp_path, epochs=2, ndf=16, n_rkhs=64))


def test_finished_run_is_not_trained_again(tmp_path):
    pretrain(tiny(tmp_path, epochs=1))
    before = checkpoint.load(tmp_path / "checkpoint.pt")["encoder"]
    metrics = pretrain(tiny(tmp_path, epochs=1))
    after = checkpoint.load(tmp_path / "checkpoint.pt")["encoder"]
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert metrics["epoch"] == 1 and "test_linear_acc" in metrics  # the finished run's metrics


def test_schedule_is_warmup_then_steps():
    cfg = preset("cifar-small", warmup_steps=500)
    assert lr_factor(0, 250, cfg) == pytest.approx(1 / 500)
    assert lr_factor(499, 250, cfg) == 1.0
    # as the authors' MultiStepLR.step(epoch) at each epoch's end: the decay for milestone m
    # starts with epoch index m + 1
    assert lr_factor(250 * 251 - 1, 250, cfg) == 1.0
    assert lr_factor(250 * 251, 250, cfg) == pytest.approx(0.2)
    assert lr_factor(250 * 281, 250, cfg) == pytest.approx(0.04)


def test_batches_resume_and_shard():
    def indices(batches):
        return [[i for _, _, i in keys] for keys in batches]

    assert list(EpochBatches(10, 3, seed=1, epoch=2))[1][0][:2] == (2, 1)  # (epoch, batch, i)
    full = indices(EpochBatches(10, 3, seed=1, epoch=2))
    assert len(full) == 3 and all(len(b) == 3 for b in full)  # the last, partial batch dropped
    assert len(set(sum(full, []))) == 9 and sum(full, []) != list(range(9))
    assert indices(EpochBatches(10, 3, seed=1, epoch=2, start=1)) == full[1:]
    assert full != indices(EpochBatches(10, 3, seed=1, epoch=3))
    halves = [indices(EpochBatches(10, 4, 1, 2, rank=r, world_size=2)) for r in (0, 1)]
    assert [a + b for a, b in zip(*halves)] == indices(EpochBatches(10, 4, 1, 2))


def test_cli_flags_map_onto_config(tmp_path, capsys):
    main(["pretrain", "--ndf", "8", "--n-rkhs", "64", "--n-depth", "1", "--batch-size", "16",
          "--steps-per-epoch", "2", "--epochs", "1", "--workers", "0", "--no-final-probe",
          "--lr-milestones", "5", "7", "--run-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["lr_milestones"] == [5, 7] and saved["final_probe"] is False
    assert saved["lr"] == preset("digits").lr  # untouched flags keep the preset's value
    assert '"epoch": 1' in capsys.readouterr().out


def test_cli_rejects_impossible_config(tmp_path):
    with pytest.raises(SystemExit, match="n_rkhs=32 is smaller than the last trunk width 128"):
        main(["pretrain", "--ndf", "32", "--n-rkhs", "32", "--run-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="batch_size must be at least 2"):
        main(["pretrain", "--batch-size", "1", "--run-dir", str(tmp_path)])


def test_demo_learns_clearly_better_than_random_init(tmp_path, capsys):
    """The README's main command, shortened to 2 epochs: pretraining must beat random init."""
    metrics = pretrain(preset("digits", run_dir=str(tmp_path), epochs=2, lr_milestones=(),
                              device="cpu"))
    assert metrics["final_linear_probe_acc"] >= metrics["random_init_linear_probe_acc"] + 0.05
    assert "same architecture at random init" in capsys.readouterr().out


def test_device_data_path_trains_like_the_loader_path(tmp_path):
    """The batched on-device views (the GPU path) and the PIL workers' views train alike."""
    losses, metrics = {}, {}
    for data_path in ("device", "loader"):
        run_dir = tmp_path / data_path
        metrics[data_path] = pretrain(tiny(run_dir, epochs=3, data_path=data_path,
                                           steps_per_epoch=0, batch_size=64, ndf=16))
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        losses[data_path] = [json.loads(line)["loss"] for line in lines]
    for data_path in losses:
        assert losses[data_path][-1] < losses[data_path][0] - 1.0, losses
        assert metrics[data_path]["test_mlp_acc"] > 0.3  # 10 classes: chance is 0.1
    assert losses["device"][-1] == pytest.approx(losses["loader"][-1], rel=0.02)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_finite(tmp_path, precision):
    metrics = pretrain(tiny(tmp_path, epochs=1, precision=precision))
    assert all(metrics[k] == metrics[k] and abs(metrics[k]) < 1e4
               for k in ("loss_1t5", "loss_1t7", "loss_5t5", "score_reg", "loss"))


@pytest.mark.gpu
def test_cuda_run_on_the_device_data_path(tmp_path):
    """On a GPU: channels-last, torch.compile, bf16, the dataset cached on the device."""
    metrics = pretrain(tiny(tmp_path, epochs=2, device="cuda", data_path="auto",
                            precision="bf16", compile=True, batch_size=64, steps_per_epoch=0))
    assert checkpoint.load(tmp_path / "checkpoint.pt")["data_path"] == "device"
    assert metrics["test_mlp_acc"] > 0.2
    pretrain(tiny(tmp_path, epochs=3, device="cuda", precision="bf16", batch_size=64,
                  steps_per_epoch=0))  # resumes on the device path


@pytest.mark.parametrize("data_path, workers", [("loader", 2), ("device", 0), ("sharded", 0)])
def test_stop_mid_epoch_then_resume_equals_uninterrupted_run(tmp_path, monkeypatch, data_path,
                                                             workers):
    """Weights and every epoch's metrics equal, with worker processes building the views."""
    import os
    import signal

    import amdim.training.pretraining

    settings = dict(epochs=3, data_path=data_path, workers=workers)
    pretrain(tiny(tmp_path / "straight", **settings))
    lr_factor = amdim.training.pretraining.lr_factor

    def interrupt_at_step_4(step, *args):
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)  # handled: save at the step's end and return
        return lr_factor(step, *args)

    monkeypatch.setattr(amdim.training.pretraining, "lr_factor", interrupt_at_step_4)
    stopped = pretrain(tiny(tmp_path / "resumed", **settings))
    assert stopped["stopped"] == "SIGINT" and stopped["step"] == 5
    monkeypatch.setattr(amdim.training.pretraining, "lr_factor", lr_factor)
    pretrain(tiny(tmp_path / "resumed", **settings))
    a = checkpoint.load(tmp_path / "straight" / "checkpoint.pt")
    b = checkpoint.load(tmp_path / "resumed" / "checkpoint.pt")
    assert all(torch.equal(a["encoder"][k], b["encoder"][k]) for k in a["encoder"])
    lines = [(tmp_path / r / "metrics.jsonl").read_text().splitlines() for r in ("straight", "resumed")]
    drop = lambda line: {k: v for k, v in json.loads(line).items() if k not in TIMINGS}
    assert [drop(x) for x in lines[0]] == [drop(x) for x in lines[1]]


def test_auto_data_path_needs_in_memory_images_of_one_size(tmp_path):
    from PIL import Image

    from amdim.data.device_images import stored_size
    from amdim.training.inputs import choose_data_path
    from amdim.training.inputs import build_datasets

    digits_train, _, _ = build_datasets(preset("digits"))
    assert stored_size(digits_train) == (32, 32)
    for label in ("a", "b"):
        (tmp_path / "train" / label).mkdir(parents=True)
        Image.new("RGB", (40, 30)).save(tmp_path / "train" / label / "x.png")
    folder_train, _, _ = build_datasets(preset("digits", data=str(tmp_path)))
    assert stored_size(folder_train) is None  # sizes unknown until decoded
    # small images: decoded batch by batch; on a CPU, larger ones go to the loader workers
    assert choose_data_path(preset("digits", data=str(tmp_path)), folder_train,
                            torch.device("cpu")) == "decode"
    assert choose_data_path(preset("digits", data=str(tmp_path), augment="randaugment"),
                            folder_train, torch.device("cpu")) == "loader"
    large = tmp_path / "large"
    for label in ("a", "b"):
        (large / "train" / label).mkdir(parents=True)
        Image.new("RGB", (100, 80)).save(large / "train" / label / "x.png")
    large_train, _, _ = build_datasets(preset("digits", data=str(large)))
    assert choose_data_path(preset("digits", data=str(large)), large_train,
                            torch.device("cpu")) == "loader"  # 100 px > twice 32 px
    assert choose_data_path(preset("digits", data_path="device"), digits_train,
                            torch.device("cpu")) == "device"


def test_time_limit_saves_and_stops(tmp_path, monkeypatch):
    stopped = pretrain(tiny(tmp_path, epochs=3, time_limit=1e-9))  # in start-up: no step
    assert stopped == {"stopped": "time limit"} and not (tmp_path / "checkpoint.pt").exists()
    import signal
    import amdim.training.pretraining as training

    def limit_reached_in_step_0(step, *args):  # the time limit's alarm, in the first step
        if step == 0:
            signal.raise_signal(signal.SIGALRM)
        return lr_factor(step, *args)

    monkeypatch.setattr(training, "lr_factor", limit_reached_in_step_0)
    stopped = pretrain(tiny(tmp_path, epochs=3, time_limit=60))
    monkeypatch.undo()
    assert stopped["stopped"] == "time limit" and stopped["step"] == 1
    assert checkpoint.load(tmp_path / "checkpoint.pt")["step"] == 1
    assert pretrain(tiny(tmp_path, epochs=3))["step"] == 9  # rerun without the limit: resumes


def test_a_run_saved_before_a_setting_existed_resumes(tmp_path):
    """A checkpoint whose config lacks a later field (e.g. backbone) reads it as the default."""
    pretrain(tiny(tmp_path, epochs=1))
    state = checkpoint.load(tmp_path / "checkpoint.pt")
    del state["config"]["backbone"]
    checkpoint.save_atomic(state, tmp_path / "checkpoint.pt")
    assert pretrain(tiny(tmp_path, epochs=2))["epoch"] == 2
