import json

import numpy as np
import pytest
import torch

from amdim import Encoder, EncoderConfig
from amdim.model.nce import multiscale_nce

TINY = dict(ndf=8, n_rkhs=64, n_depth=2)


@pytest.mark.parametrize("size", [32, 64, 128])
def test_feature_shapes(size):
    encoder = Encoder(EncoderConfig(image_size=size, **TINY))
    r1, r5, r7 = encoder(torch.randn(3, 3, size, size))
    assert r1.shape == (3, 64, 1, 1)
    assert r5.shape == (3, 64, 5, 5)
    assert r7.shape == (3, 64, 7, 7)
    assert encoder.global_features(torch.randn(2, 3, size, size)).shape == (2, 64)


def test_parameter_counts_match_authors(reference):
    rows = json.loads((reference / "encoder_sizes.json").read_text())
    assert len(rows) == 7
    for row in rows:
        cfg = EncoderConfig(image_size=row["image_size"], ndf=row["ndf"],
                            n_rkhs=row["n_rkhs"], n_depth=row["n_depth"])
        with torch.device("meta"):  # no memory for the 666M-parameter model
            encoder = Encoder(cfg)
        assert sum(p.numel() for p in encoder.parameters()) == row["encoder_params"], row
        with torch.device("meta"):
            features = encoder(torch.empty(2, 3, cfg.image_size, cfg.image_size))
        for name, shape in row["feature_shapes"].items():
            assert tuple(getattr(features, name).shape[1:]) == tuple(shape)


@pytest.mark.parametrize("size", [32, 64, 128])
def test_outputs_match_authors_checkpoint(reference, size):
    checkpoint = torch.load(reference / f"authors_format_ndf8_{size}px.pth", weights_only=True)
    h = checkpoint["hyperparams"]
    encoder = Encoder(EncoderConfig(image_size=size, ndf=h["ndf"], n_rkhs=h["n_rkhs"],
                                    n_depth=h["n_depth"], use_bn=h["use_bn"]))
    prefix = "encoder.module."
    encoder.load_state_dict({k[len(prefix):]: v for k, v in checkpoint["model"].items()
                             if k.startswith(prefix)})
    expected = np.load(reference / f"authors_format_ndf8_{size}px_expected.npz")
    with torch.no_grad():
        features = encoder.eval()(torch.from_numpy(expected["x"]))
    for name in ("r1", "r5", "r7"):
        torch.testing.assert_close(getattr(features, name), torch.from_numpy(expected[name]),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(image_size=48), "image_size 48"),
    (dict(image_size=32, ndf=64, n_rkhs=128), "n_rkhs=128 is smaller than the last trunk width 256"),
    (dict(image_size=64, ndf=16, n_rkhs=64), "raise n_rkhs to at least 128"),
    (dict(n_depth=0), "n_depth must be a positive integer"),
])
def test_impossible_configs_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EncoderConfig(**kwargs)


def test_wrong_input_shape_is_explained():
    encoder = Encoder(EncoderConfig(image_size=32, **TINY))
    with pytest.raises(ValueError, match=r"shape \(B, 3, 32, 32\), got \(2, 3, 64, 64\)"):
        encoder(torch.randn(2, 3, 64, 64))


def test_init_is_the_authors_fixup_style():
    encoder = Encoder(EncoderConfig(image_size=32, **TINY))
    x = torch.randn(4, 3, 32, 32)
    # second convs start at zero, so every residual layer is its average-pool shortcut
    for name, p in encoder.named_parameters():
        if name.endswith("conv2.weight"):
            assert p.abs().sum() == 0, name
    head = encoder.rkhs_block_5.shortcut.weight.detach()[:, :, 0, 0].clone()  # (n_rkhs, trunk_width)
    torch.testing.assert_close(head[:32].diagonal(), torch.ones(32))
    assert head.fill_diagonal_(0).abs().max() <= 0.01
    assert torch.isfinite(encoder(x).r1).all()


def test_64px_encoder_builds_and_draws_only_its_own_stem():
    torch.manual_seed(0)
    encoder = Encoder(EncoderConfig(image_size=64, **TINY))
    torch.manual_seed(0)
    stem = torch.nn.Conv2d(3, 8, 3)  # the first module built: nothing drawn before it
    assert encoder.layer_list[0].conv.weight.shape == (8, 3, 3, 3)
    assert torch.equal(encoder.layer_list[0].conv.weight, stem.weight)


def test_gradients_reach_every_parameter():
    encoder = Encoder(EncoderConfig(image_size=32, use_bn=True, **TINY))
    optimiser = torch.optim.Adam(encoder.parameters(), lr=1e-3)
    x1, x2 = torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32)
    for _ in range(2):  # the first step moves the zero-initialised convs off zero
        optimiser.zero_grad()
        sum(multiscale_nce(encoder(x1), encoder(x2)).values()).backward()
        missing = [n for n, p in encoder.named_parameters()
                   if p.grad is None or p.grad.abs().sum() == 0]
        optimiser.step()
    assert missing == []
