import argparse
import json

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from amdim import Encoder, Probes
from amdim.config import PretrainConfig
from amdim.evaluation.segment import (compare_maps, load_mixture_model, register, segment_images,
                                      spatial_coherence, within_image_structure)
from amdim.model.mixture import MixtureHead
from amdim.training.checkpoint import FORMAT, CheckpointError, save_atomic

TINY = dict(data="digits", image_size=32, ndf=8, n_rkhs=64, n_depth=1, batch_size=8, workers=0)


def save_checkpoint(path, n_mixtures):
    cfg = PretrainConfig(**TINY)
    state = {"format": FORMAT,
             "config": {**cfg.to_dict(), "n_mixtures": n_mixtures, "mixture_entropy": 1.0},
             "n_classes": 10, "encoder": Encoder(cfg.encoder).state_dict(),
             "probes": Probes(cfg.n_rkhs, 10).state_dict(), "epoch": 1, "step": 1,
             # None without a head, as the training loop saves it
             "mixture_head": MixtureHead(cfg.n_rkhs, n_mixtures).state_dict()
             if n_mixtures > 1 else None}
    save_atomic(state, path)


def run_cli(*argv):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["segment", *map(str, argv)])
    args.func(args)


@pytest.mark.parametrize("device", ["auto", "cpu"])  # auto: on CUDA where there is one
def test_cli_writes_png_and_coherence(tmp_path, capsys, device):
    save_checkpoint(tmp_path / "model.pth", n_mixtures=3)
    out = tmp_path / "maps.png"
    run_cli(tmp_path / "model.pth", "--data", "digits", "--out", out, "--n-images", 4,
            "--spatial-coherence", "--device", device)
    pixels = imread(out)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 150
    assert pixels[..., :3].std() > 0.05  # images and colours, not a blank canvas
    coherence = json.loads((tmp_path / "maps_coherence.json").read_text())
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == coherence
    for name in ("r7", "r5"):
        assert 0 <= coherence[name]["agreement"] <= 1
        assert 1 / 3 - 1e-9 <= coherence[name]["chance"] <= 1


def test_checkpoint_without_mixture_is_refused(tmp_path):
    save_checkpoint(tmp_path / "plain.pth", n_mixtures=1)
    with pytest.raises(CheckpointError, match="no mixture head.*--n-mixtures"):
        load_mixture_model(tmp_path / "plain.pth")
    with pytest.raises(SystemExit, match="amdim segment: .*no mixture head.*--n-mixtures"):
        run_cli(tmp_path / "plain.pth", "--out", tmp_path / "maps.png")
    assert not (tmp_path / "maps.png").exists()


def test_segment_images_on_random_model(tmp_path):
    encoder = Encoder(PretrainConfig(**TINY).encoder).eval()
    images = torch.randn(3, 3, 32, 32)
    coherence = segment_images(encoder, MixtureHead(64, 12), images, (0.5,) * 3, (0.5,) * 3,
                               tmp_path / "grid.png", tclip=20.0, alpha=0.5)
    assert set(coherence) == {"r7", "r5"} and (tmp_path / "grid.png").stat().st_size > 5000


def one_hot(labels, n_mixtures):
    """(B, H, W) component indices -> (B, K, H, W) posterior."""
    return torch.nn.functional.one_hot(torch.as_tensor(labels), n_mixtures).permute(0, 3, 1, 2).float()


def test_spatial_coherence_on_hand_made_maps():
    uniform = spatial_coherence(one_hot(np.zeros((2, 7, 7), dtype=np.int64), 3))
    assert uniform == {"agreement": 1.0, "chance": 1.0}
    checkerboard = np.indices((5, 5)).sum(0)[None] % 2  # (1, 5, 5): 13 zeros, 12 ones
    assert spatial_coherence(one_hot(checkerboard, 2)) == {"agreement": 0.0,
                                                           "chance": pytest.approx(0.5008)}
    halves = np.array([[[0, 0], [1, 1]]])  # 2 horizontal pairs agree, 2 vertical do not
    assert spatial_coherence(one_hot(halves, 4)) == {"agreement": 0.5, "chance": 0.5}
    soft = torch.tensor([[[[0.6, 0.2]], [[0.4, 0.8]]]])  # (1, 2, 1, 2): argmax 0 then 1
    assert spatial_coherence(soft)["agreement"] == 0.0


def test_within_image_structure_tells_image_clusters_from_segments():
    whole_images = one_hot(np.array([np.zeros((5, 5)), np.ones((5, 5))], dtype=np.int64), 4)
    assert spatial_coherence(whole_images) == {"agreement": 1.0, "chance": 0.5}
    assert within_image_structure(whole_images) == {"chance_within_image": 1.0,
                                                    "components_per_image": 1.0}
    halves = np.array([[[0, 0], [1, 1]], [[2, 2], [2, 2]]])  # 2 then 1 components
    assert within_image_structure(one_hot(halves, 3)) == {"chance_within_image": 0.75,
                                                          "components_per_image": 1.5}


def test_compare_maps_draws_a_row_per_model(tmp_path):
    pictures = np.random.default_rng(0).random((3, 32, 32, 3))
    maps = {"K=4": torch.rand(3, 4, 7, 7), "K=8": torch.rand(3, 8, 5, 5)}
    compare_maps(pictures, maps, tmp_path / "rows.png")
    pixels = imread(tmp_path / "rows.png")
    assert pixels.shape[1] > 1.5 * pixels.shape[0]  # 3 images across, 3 rows down, a legend


def test_cli_draws_the_test_images_it_is_given(tmp_path):
    save_checkpoint(tmp_path / "model.pth", n_mixtures=3)
    run_cli(tmp_path / "model.pth", "--data", "digits", "--out", tmp_path / "some.png",
            "--indices", 5, 2, 9)
    assert imread(tmp_path / "some.png").shape[0] > 300  # three rows of images
    with pytest.raises(SystemExit, match="--indices must lie in \\[0, 360\\)"):
        run_cli(tmp_path / "model.pth", "--data", "digits", "--out", tmp_path / "x.png",
                "--indices", 0, 360)
    with pytest.raises(SystemExit, match="at least 2 images"):
        run_cli(tmp_path / "model.pth", "--data", "digits", "--out", tmp_path / "x.png",
                "--indices", 4)
    assert not (tmp_path / "x.png").exists()


# -- issue 24, class 8: no dead ends

def test_an_export_keeps_the_mixture_head_and_segment_says_what_is_missing(tmp_path, capsys):
    from amdim.training.checkpoint import export_encoder, load

    save_checkpoint(tmp_path / "model.pth", n_mixtures=2)
    exported = export_encoder(tmp_path / "model.pth", tmp_path / "encoder.pt")
    run_cli(exported, "--data", "digits", "--out", tmp_path / "maps.png", "--n-images", 2,
            "--device", "cpu")
    assert (tmp_path / "maps.png").is_file()
    old = {k: v for k, v in load(exported).items() if k not in ("mixture_head", "digest")}
    save_atomic(old, tmp_path / "old-export.pt")  # an export that left the head out
    with pytest.raises(SystemExit, match=r"--n-mixtures 2 but holds no mixture head.*"
                                         r"checkpoint\.pt") as stopped:
        run_cli(tmp_path / "old-export.pt", "--out", tmp_path / "old.png")
    assert "pretrain with --n-mixtures" not in str(stopped.value)


def test_segment_refuses_a_grid_too_large_to_lay_out(tmp_path):
    save_checkpoint(tmp_path / "model.pth", n_mixtures=2)
    with pytest.raises(SystemExit, match="at most 64.*--indices"):
        run_cli(tmp_path / "model.pth", "--out", tmp_path / "maps.png", "--n-images", 400)
    assert not (tmp_path / "maps.png").exists()


def test_segment_reports_the_file_it_wrote(tmp_path, capsys):
    save_checkpoint(tmp_path / "model.pth", n_mixtures=2)
    folder = tmp_path / "figures"
    folder.mkdir()
    for out, written in ((folder, folder / "model.segment.png"),
                         (tmp_path / "grid", tmp_path / "grid.png")):
        run_cli(tmp_path / "model.pth", "--out", out, "--n-images", 2, "--device", "cpu",
                "--spatial-coherence")
        printed = capsys.readouterr().out.splitlines()
        assert written.is_file() and printed[0] == str(written)
        assert written.with_name(written.stem + "_coherence.json").is_file()
    with pytest.raises(SystemExit, match="is this command's input"):
        run_cli(tmp_path / "model.pth", "--out", tmp_path / "model.pth")


def test_segment_and_plot_take_a_view_of_a_multiview_checkpoint(tmp_path):
    from amdim.evaluation import plots
    from amdim.training.pretraining import pretrain
    from tests.model.test_multiview import paired_npz, tiny

    data = paired_npz(tmp_path / "scenes_train.npz")
    paired_npz(tmp_path / "scenes_test.npz", n=20)
    pretrain(tiny(tmp_path / "run", epochs=1, views="paired", data=str(data), n_mixtures=2))
    path = tmp_path / "run" / "checkpoint.pt"
    with pytest.raises(SystemExit, match="--view NAME"):
        run_cli(path, "--out", tmp_path / "maps.png")
    run_cli(path, "--view", "gray", "--out", tmp_path / "gray.png", "--n-images", 4,
            "--device", "cpu")
    run_cli(path, "--view", "left", "--out", tmp_path / "left.png", "--n-images", 4,
            "--device", "cpu")
    assert (tmp_path / "gray.png").is_file() and (tmp_path / "left.png").is_file()
    parser = argparse.ArgumentParser()
    plots.register(parser.add_subparsers())
    args = parser.parse_args(["plot", str(path), "--view", "gray", "--workers", "0",
                              "--device", "cpu"])
    args.func(args)
    assert (tmp_path / "run" / "checkpoint.tsne-gray.png").is_file()


def test_segment_refuses_indices_and_n_images_together(tmp_path):
    save_checkpoint(tmp_path / "model.pth", n_mixtures=2)
    with pytest.raises(SystemExit, match="give one of them"):
        run_cli(tmp_path / "model.pth", "--out", tmp_path / "maps.png", "--n-images", 3,
                "--indices", 0, 1)
