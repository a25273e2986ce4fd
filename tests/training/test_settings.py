"""Issue 24, class 2 and 8 on the pretraining side: every float setting finite and in range
through one check, settings that do not apply refused or warned about (and config.json
records what ran), compute threads never beyond the usable cores."""
import dataclasses
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from amdim.cli import main
from amdim.config import PretrainConfig, preset
from amdim.evaluation.classifier_training import EvaluationConfig
from amdim.runtime import available_cores, resolve_runtime
from amdim.training.pretraining import pretrain
from tests.training.test_reliability import TINY, tiny

FLOATS = [f.name for f in dataclasses.fields(PretrainConfig) if isinstance(f.default, float)]


@pytest.mark.parametrize("name", FLOATS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_every_float_setting_must_be_finite(name, value):
    with pytest.raises(ValueError, match=f"{name} must be finite"):
        preset("digits", **{name: value})


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(EvaluationConfig)
                                  if isinstance(f.default, (float, tuple))
                                  and f.name != "lr_milestones"])
def test_every_float_setting_of_evaluate_must_be_finite(name):
    default = getattr(EvaluationConfig(), name)
    bad = (float("nan"),) * len(default) if isinstance(default, tuple) else float("nan")
    with pytest.raises(ValueError, match=f"{name} must be finite"):
        EvaluationConfig(**{name: bad})


@pytest.mark.parametrize("name, value", [("adam_beta1", 1.0), ("adam_beta2", -0.1),
                                         ("weight_decay", -1e-5), ("mixture_entropy", 0.0),
                                         ("lr_gamma", 0.0), ("time_limit", -1.0)])
def test_float_settings_out_of_range_are_refused(name, value):
    with pytest.raises(ValueError, match=f"{name} must be"):
        preset("digits", **{name: value})


@pytest.mark.parametrize("flag", ["--time-limit", "--lr-gamma", "--tclip", "--mixture-entropy"])
def test_nan_flags_stop_before_anything_is_written(tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as stopped:
        main(["pretrain", flag, "nan", "--run-dir", str(tmp_path / "run")])
    assert stopped.value.code == 2 and "not a finite number" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("views", ["lab", "paired"])
@pytest.mark.parametrize("augment", ["randaugment", "trivialaugment", "imagenet-faa"])
def test_an_augmentation_policy_with_views_from_the_data_is_refused(views, augment):
    with pytest.raises(ValueError, match=f"--augment {augment} .*--views {views}.*drop --augment"):
        preset("digits", views=views, augment=augment, data_path="loader")


def test_threads_beyond_the_usable_cores_are_clamped_and_recorded(caplog):
    cfg = preset("digits", threads=available_cores() + 100, device="cpu")
    with caplog.at_level(logging.WARNING, logger="amdim"):
        ran = resolve_runtime(cfg, torch.device("cpu"), "device")
    assert ran.threads == available_cores() and "os.sched_getaffinity" in caplog.text


def test_final_probe_on_unlabelled_data_is_warned_about_and_not_recorded(tmp_path, caplog):
    folder = tmp_path / "photos"  # no train/: unlabelled
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(20):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).save(folder / f"{i}.png")
    cfg = tiny(tmp_path / "run", data=str(folder), batch_size=8, steps_per_epoch=1, epochs=1,
               final_probe=True)
    with caplog.at_level(logging.WARNING, logger="amdim"):
        metrics = pretrain(cfg)
    assert "--final-probe needs labels" in caplog.text
    assert not any(key.startswith("final_") for key in metrics)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["final_probe"] is False
