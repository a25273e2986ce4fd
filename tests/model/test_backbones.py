"""Standard backbones under AMDIM's heads (amdim.backbones): shapes, stage rule, gradients,
checkpoints, a tiny timm model end to end; the paper's encoder stays the default."""
import argparse

import pytest
import torch

from amdim.config import EncoderConfig, PretrainConfig, preset
from amdim.model.amdim import AMDIM
from amdim.model.backbones import BackboneEncoder, build_encoder, nearest_stage
from amdim.model.encoder import Encoder
from amdim.training import benchmark, checkpoint
from amdim.training.pretraining import pretrain
from tests.training.test_pretraining import tiny

TIMM_TINY = "timm:test_efficientnet"  # timm's 82k-parameter test model
BACKBONES = ("resnet18", "resnet50", TIMM_TINY)
SIZES = (32, 64, 128)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_features_have_the_paper_shapes(backbone, size):
    encoder = build_encoder(EncoderConfig(image_size=size, n_rkhs=64, backbone=backbone))
    features = encoder(torch.randn(2, 3, size, size))
    assert [tuple(f.shape) for f in features] == [(2, 64, 1, 1), (2, 64, 5, 5), (2, 64, 7, 7)]
    assert encoder.global_features(torch.randn(2, 3, size, size)).shape == (2, 64)
    with pytest.raises(ValueError, match=f"takes images of shape \\(B, 3, {size}, {size}\\)"):
        encoder(torch.randn(2, 3, size + 1, size + 1))


@pytest.mark.parametrize("size", SIZES)
def test_resnet_stages_are_32_16_8_4_at_every_size(size):
    encoder = build_encoder(EncoderConfig(image_size=size, n_rkhs=64, backbone="resnet18"))
    maps = encoder.trunk(torch.randn(1, 3, size, size))
    assert [m.shape[-1] for m in maps] == encoder.stage_sides == [32, 16, 8, 4]
    assert (encoder.index_7, encoder.index_5) == (2, 3)  # r7 from 8x8, r5 from 4x4


def test_nearest_stage_rule():
    assert nearest_stage([32, 16, 8, 4], 7) == 2 and nearest_stage([32, 16, 8, 4], 5) == 3
    assert nearest_stage([16, 8, 4, 2, 1], 7) == 1 and nearest_stage([16, 8, 4, 2, 1], 5) == 2
    assert nearest_stage([14, 7, 5, 3], 7) == 1 and nearest_stage([14, 7, 5, 3], 5) == 2
    assert nearest_stage([2, 2, 2], 7) == 2  # equal sides: the deepest
    assert nearest_stage([12, 3], 6) == 0  # equal ratios: the larger, pooled down


@pytest.mark.parametrize("backbone", ["resnet18", TIMM_TINY])
def test_gradients_reach_every_backbone_parameter(backbone):
    cfg = preset("digits", n_rkhs=64, backbone=backbone, batch_size=4)
    model = AMDIM(cfg, n_classes=10)
    x1, x2 = torch.randn(2, 4, 3, 32, 32)
    model(x1, x2, torch.arange(4))["loss"].backward()
    for name, parameter in model.encoder.named_parameters():
        if not parameter.requires_grad:  # the heads' batch norm off with use_bn, as the paper's
            assert ".bn_hid." in name, name
            continue
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        if name.startswith("trunk."):
            assert parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("backbone", ["resnet18", TIMM_TINY])
def test_checkpoint_round_trip_rebuilds_the_backbone(tmp_path, backbone):
    model = AMDIM(preset("digits", n_rkhs=64, backbone=backbone), n_classes=10)
    cfg = preset("digits", n_rkhs=64, backbone=backbone)
    state = {"format": checkpoint.FORMAT, "config": cfg.to_dict(), "n_classes": 10,
             "encoder": model.encoder.state_dict(), "probes": model.probes.state_dict(),
             "epoch": 1, "step": 1}
    checkpoint.save_atomic(state, tmp_path / "checkpoint.pt")
    encoder = checkpoint.load_encoder(tmp_path / "checkpoint.pt")
    assert isinstance(encoder, BackboneEncoder) and encoder.cfg.backbone == backbone
    images = torch.randn(3, 3, 32, 32)
    expected = model.encoder.eval()(images)
    for got, want in zip(encoder(images), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_tiny_timm_model_end_to_end(tmp_path, capsys):
    """pretrain (mixtures on, final probe against random init), resume, load, evaluate."""
    run_dir = tmp_path / "run"
    metrics = pretrain(tiny(run_dir, epochs=1, steps_per_epoch=2, backbone=TIMM_TINY,
                            n_mixtures=2, final_probe=True))
    assert metrics["step"] == 2 and 0 <= metrics["final_linear_probe_acc"] <= 1
    assert "same architecture at random init" in capsys.readouterr().out
    assert pretrain(tiny(run_dir, epochs=2, steps_per_epoch=2, backbone=TIMM_TINY,
                         n_mixtures=2))["step"] == 4  # resumed
    encoder = checkpoint.load_encoder(run_dir / "checkpoint.pt")
    assert encoder.cfg.backbone == TIMM_TINY
    assert encoder.global_features(torch.randn(2, 3, 32, 32)).shape == (2, 64)


def test_pretrained_weights_are_refused_clearly():
    with pytest.raises(ValueError, match="never downloaded.*random init"):
        EncoderConfig(backbone="resnet50:pretrained")
    with pytest.raises(ValueError, match="never downloaded"):
        PretrainConfig(backbone=f"{TIMM_TINY}:pretrained")


def test_unknown_backbones_are_refused():
    with pytest.raises(ValueError, match="unknown backbone 'vgg16'"):
        EncoderConfig(backbone="vgg16")
    with pytest.raises(ValueError, match="timm:no_such_model.*Unknown model"):
        build_encoder(EncoderConfig(backbone="timm:no_such_model"))
    with pytest.raises(ValueError, match="build_encoder"):
        Encoder(EncoderConfig(backbone="resnet18"))


def test_default_is_the_papers_encoder():
    cfg = PretrainConfig()
    assert cfg.backbone == "amdim" and cfg.encoder == EncoderConfig(n_rkhs=1024, ndf=128)
    encoder = build_encoder(preset("digits").encoder)
    assert type(encoder) is Encoder
    assert encoder.state_dict().keys() == Encoder(preset("digits").encoder).state_dict().keys()


def test_benchmark_reports_backbone_and_parameters():
    parser = argparse.ArgumentParser()
    benchmark.register(parser.add_subparsers())
    args = parser.parse_args(["benchmark", "--backbone", TIMM_TINY, "--image-size", "64",
                              "--n-rkhs", "64", "--batch-size", "4", "--steps", "1",
                              "--warmup", "0", "--device", "cpu", "--no-compile"])
    results = benchmark.run(args)
    assert results["backbone"] == TIMM_TINY and results["image_size"] == 64
    assert 8e4 < results["encoder_parameters"] < 2e5 and results["flop_per_image"] > 0


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "mixer_s16_224"])
def test_timm_models_of_a_fixed_input_size_are_refused_clearly(name):
    pytest.importorskip("timm")
    with pytest.raises(ValueError, match=rf"timm:{name} takes only 224x224 px images.*32 px"
                                         r".*convolutional timm model"):
        build_encoder(EncoderConfig(backbone=f"timm:{name}", n_rkhs=64))
