import argparse
import json
import logging

import numpy as np
import pytest
from PIL import Image

from amdim.config import preset
from amdim.evaluation import plots
from amdim.model.classifiers import Probes
from amdim.model.encoder import Encoder
from amdim.training import checkpoint

PNG = b"\x89PNG\r\n\x1a\n"
KEYS = ("loss_1t5", "loss_1t7", "loss_5t5", "score_reg", "loss", "probe_linear_acc",
        "probe_mlp_acc", "images_per_s")


def run_plot(*argv) -> None:
    parser = argparse.ArgumentParser()
    plots.register(parser.add_subparsers())
    args = parser.parse_args(["plot", *map(str, argv), "--workers", "0", "--device", "cpu"])
    args.func(args)


def write_metrics(run_dir, keys=KEYS, epochs=5, torn=False):
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"epoch": e, "step": 10 * e, "stopped": "no",
                         **{k: 1.0 / e for k in keys}}) for e in range(1, epochs + 1)]
    text = "\n".join(lines) + "\n" + ('{"epoch": 6, "lo' if torn else "")
    (run_dir / "metrics.jsonl").write_text(text)
    return run_dir


def labelled_run(tmp_path):
    """A run folder with a checkpoint whose data is a tiny labelled image folder."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, name in enumerate(("cat", "dog", "emu")):
            (tmp_path / "images" / split / name).mkdir(parents=True)
            for i in range(4):
                pixels = (rng.integers(0, 60, (32, 32, 3)) + 90 * c).astype(np.uint8)
                Image.fromarray(pixels).save(tmp_path / "images" / split / name / f"{i}.png")
    cfg = preset("digits", data=str(tmp_path / "images"), image_size=32, ndf=8, n_rkhs=64,
                 n_depth=1)
    run_dir = write_metrics(tmp_path / "run")
    checkpoint.save_atomic({"format": checkpoint.FORMAT, "config": cfg.to_dict(), "n_classes": 3,
                            "encoder": Encoder(cfg.encoder).state_dict(),
                            "probes": Probes(64, 3).state_dict()}, run_dir / "checkpoint.pt")
    return run_dir


def test_curves_from_a_run_folder_skip_a_torn_last_line(tmp_path, caplog, capsys):
    run_dir = write_metrics(tmp_path / "run", torn=True)
    with caplog.at_level(logging.WARNING, logger="amdim"):
        run_plot(run_dir)
    assert "line 6 is not JSON" in caplog.text
    assert (run_dir / "curves.png").read_bytes().startswith(PNG)
    assert str(run_dir / "curves.png") in capsys.readouterr().out
    assert len(plots.read_metrics(run_dir)) == 5


@pytest.mark.parametrize("keys", [("loss",), ("probe_mlp_acc", "images_per_s"), ("lr", "other")])
def test_curves_draw_whatever_metrics_are_present(tmp_path, keys):
    rows = plots.read_metrics(write_metrics(tmp_path / "run", keys))
    out = plots.plot_curves(rows, tmp_path / "curves.png")
    assert out.read_bytes().startswith(PNG)


def test_curves_explain_missing_or_empty_metrics(tmp_path):
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        run_plot(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("\n")
    with pytest.raises(SystemExit, match="holds no metrics yet"):
        run_plot(tmp_path)


def test_tsne_keeps_separate_clusters_apart():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 64)) * 5
    labels = np.repeat(np.arange(3), 30)
    points = plots.tsne(centres[labels] + rng.normal(size=(90, 64)), seed=0)
    assert points.shape == (90, 2)
    # each point's nearest neighbour in the map is of its own cluster
    distances = ((points[:, None] - points[None]) ** 2).sum(-1) + np.eye(90) * 1e9
    assert (labels[distances.argmin(1)] == labels).mean() > 0.95


def test_tsne_map_from_extracted_features_with_unlabelled_points(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(-1, 4), 20)
    np.savez(tmp_path / "features.npz", features=rng.normal(size=(100, 16)).astype(np.float32)
             + labels[:, None], labels=labels, classes=np.array(["a", "b", "c", "d"]))
    run_plot(tmp_path / "features.npz")
    assert (tmp_path / "features.tsne.png").read_bytes().startswith(PNG)
    out = plots.plot_tsne(rng.normal(size=(100, 16)), labels, tmp_path / "few.png", max_points=40)
    assert out.read_bytes().startswith(PNG)


def test_tsne_map_of_a_checkpoint_and_of_a_run_folder(tmp_path):
    run_dir = labelled_run(tmp_path)
    run_plot(run_dir / "checkpoint.pt", "--out", tmp_path / "map.png")
    assert (tmp_path / "map.png").read_bytes().startswith(PNG)
    run_plot(run_dir, "--tsne")
    assert (run_dir / "curves.png").read_bytes().startswith(PNG)
    assert (run_dir / "tsne.png").read_bytes().startswith(PNG)
    features = np.load(run_dir / "checkpoint.test-tsne-features.npz")  # not extract's file
    assert features["features"].shape == (12, 64) and list(features["classes"]) == ["cat", "dog", "emu"]


def test_plot_rejects_out_with_several_paths(tmp_path):
    with pytest.raises(SystemExit, match="--out names one file"):
        run_plot(tmp_path / "a", tmp_path / "b", "--out", tmp_path / "x.png")
