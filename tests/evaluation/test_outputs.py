"""Issue 24, class 3: no command writes over its input or a run's files, and results of
other settings go to other default files; class 2 on the evaluation side: what the results
record is what ran."""
import json

import numpy as np
import pytest

from amdim.runtime import check_output
from amdim.training import export
from tests.evaluation.test_evaluate import image_folder, our_checkpoint, run_cli

FAST = ("--mode", "features", "--epochs", 1, "--lr-milestones", "--device", "cpu",
        "--workers", 0)


def run_folder(tmp_path):
    """A run folder as amdim pretrain leaves it: checkpoint, config, metrics, events."""
    run = tmp_path / "run"
    run.mkdir()
    our_checkpoint(run / "checkpoint.pt", data=image_folder(tmp_path / "pets"))
    (run / "config.json").write_text("{}\n")
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n')
    (run / "events.out.tfevents.1.host.1.0").write_bytes(b"events")
    return run


def run_export(*argv):
    import argparse

    parser = argparse.ArgumentParser(prog="amdim")
    export.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export", *map(str, argv)])
    args.func(args)


def test_no_command_writes_over_its_input_or_a_run_folder(tmp_path):
    run = run_folder(tmp_path)
    before = {path.name: path.read_bytes() for path in run.iterdir()}
    ckpt = run / "checkpoint.pt"
    for command, argv in (
            (run_export, (ckpt, "--out", ckpt)),
            (run_cli, ("extract", ckpt, "--out", ckpt, "--device", "cpu", "--workers", 0)),
            (run_cli, ("evaluate", ckpt, *FAST, "--out", run / "metrics.jsonl")),
            (run_cli, ("evaluate", ckpt, *FAST, "--out", run / "config.json")),
            (run_cli, ("extract", ckpt, "--out", run / "events.out.tfevents.1.host.1.0.pt",
                       "--device", "cpu")),
            (run_cli, ("plot", run / "checkpoint.pt", "--out", ckpt))):
        with pytest.raises(SystemExit, match=r"amdim \w+: --out .*(input|run folder).*another"):
            command(*argv)
    assert {path.name: path.read_bytes() for path in run.iterdir()} == before
    # another run's checkpoint is a run's file too; a new file beside the run is fine
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="run folder"):
        check_output(other / "checkpoint.pt")
    assert check_output(run / "encoder.pt", [ckpt]) == run / "encoder.pt"


def test_plot_keeps_the_maps_that_extract_saved(tmp_path):
    run = run_folder(tmp_path)
    run_cli("extract", run / "checkpoint.pt", "--maps", "--device", "cpu", "--workers", 0)
    saved = run / "checkpoint.test-features.npz"
    assert {"r5", "r7"} <= set(np.load(saved).files)
    run_cli("plot", run / "checkpoint.pt", "--device", "cpu", "--workers", 0)
    assert {"r5", "r7"} <= set(np.load(saved).files)  # plot extracts to a file of its own
    assert (run / "checkpoint.tsne.png").is_file()


def test_a_transfer_evaluation_keeps_the_native_one_and_records_the_k_that_ran(tmp_path, caplog):
    run = run_folder(tmp_path)
    native = run / "checkpoint.eval-features.json"
    run_cli("evaluate", run / "checkpoint.pt", *FAST, "--knn-k", 500)
    report = json.loads(native.read_text())
    # 12 training images: kNN ran with k = 12, and that is what is recorded
    assert report["knn_k"] == 12 and "kNN uses k=12" in caplog.text
    other = image_folder(tmp_path / "birds", classes=("owl", "emu", "tit"))
    run_cli("evaluate", run / "checkpoint.pt", *FAST, "--knn-k", 5, "--data", other)
    transfer = json.loads((run / "checkpoint.eval-features-on-birds.json").read_text())
    assert transfer["transfer"] and transfer["n_classes"] == 3
    assert json.loads(native.read_text()) == report  # the native evaluation untouched
    run_cli("extract", run / "checkpoint.pt", "--data", other, "--device", "cpu")
    assert (run / "checkpoint.test-features-on-birds.npz").is_file()


@pytest.mark.parametrize("flag", ["--lr", "--knn-temperature"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_evaluate_float_flags_must_be_finite(tmp_path, capsys, flag, value):
    ckpt = our_checkpoint(tmp_path / "model.pt")
    with pytest.raises(SystemExit) as stopped:
        run_cli("evaluate", ckpt, *FAST, f"{flag}={value}")
    assert stopped.value.code == 2 and "not a finite number" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.json"))
