import math

import numpy as np
import pytest
import torch

from amdim import Encoder, EncoderConfig, Features, multiscale_nce
from amdim.config import preset
from amdim.model.amdim import AMDIM
from amdim.model.nce import OBJECTIVE_TERMS, objective

NAMES = OBJECTIVE_TERMS


def load_case(path):
    d = np.load(path)
    views = [Features(*(torch.from_numpy(d[f"{k}_{v}"]) for k in ("r1", "r5", "r7")))
             for v in ("x1", "x2")]
    locations = (torch.from_numpy(d["src5_loc_x1"]), torch.from_numpy(d["src5_loc_x2"]))
    return views, locations, float(d["tclip"]), {k: float(d[k]) for k in NAMES}


@pytest.mark.parametrize("case", range(4))
def test_matches_authors_reference(reference, case):
    (f1, f2), locations, tclip, expected = load_case(reference / f"nce_case{case}.npz")
    losses = multiscale_nce(f1, f2, tclip=tclip, source_locations=locations)
    assert set(losses) == set(NAMES) == {"loss_1t5", "loss_1t7", "loss_5t5", "score_reg"}
    for name in NAMES:
        assert losses[name].item() == pytest.approx(expected[name], rel=1e-5), name


def naive_task(source, target, tclip):
    """The formula written as loops: each positive location against all other images' locations."""
    batch, dim = source.shape
    target = target.flatten(2).double()  # (B, D, L)
    raw = torch.einsum("id,jdl->ijl", source.double(), target) / math.sqrt(dim)
    score_reg = 0.05 * (raw ** 2).mean()
    s = tclip * torch.tanh(raw / tclip)
    total, count = 0.0, 0
    for i in range(batch):
        negatives = torch.cat([s[i, j] for j in range(batch) if j != i])
        for loc in range(s.shape[2]):
            logits = torch.cat([s[i, i, loc:loc + 1], negatives])
            total += -torch.log_softmax(logits, 0)[0]
            count += 1
    return total / count, score_reg


def test_matches_naive_loop():
    torch.manual_seed(1)
    f1, f2 = (Features(torch.randn(4, 16, 1, 1) * 3, torch.randn(4, 16, 5, 5) * 3,
                       torch.randn(4, 16, 7, 7) * 3) for _ in range(2))
    locations = (torch.randint(0, 25, (4,)), torch.randint(0, 25, (4,)))
    losses = multiscale_nce(f1, f2, tclip=5.0, source_locations=locations)
    expected = dict.fromkeys(NAMES, 0.0)
    for src, trg, loc in ((f1, f2, locations[0]), (f2, f1, locations[1])):
        r5 = torch.stack([src.r5[i, :, int(loc[i]) // 5, int(loc[i]) % 5] for i in range(4)])
        for name, vectors, maps in (("loss_1t5", src.r1.flatten(1), trg.r5),
                                    ("loss_1t7", src.r1.flatten(1), trg.r7),
                                    ("loss_5t5", r5, trg.r5)):
            loss, reg = naive_task(vectors, maps, 5.0)
            expected[name] += 0.5 * loss
            expected["score_reg"] += 0.5 * reg
    for name in NAMES:
        assert losses[name].item() == pytest.approx(float(expected[name]), rel=1e-5), name


def test_random_locations_and_batch_size_one():
    f = Features(torch.randn(3, 8, 1, 1), torch.randn(3, 8, 5, 5), torch.randn(3, 8, 7, 7))
    assert all(torch.isfinite(v) for v in multiscale_nce(f, f).values())
    one = Features(*(t[:1] for t in f))
    with pytest.raises(ValueError, match="at least 2 images"):
        multiscale_nce(one, one)


def test_finite_under_bf16_autocast():
    encoder = Encoder(EncoderConfig(image_size=32, ndf=8, n_rkhs=64, n_depth=1))
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f1, f2 = encoder(x1), encoder(x2)
        losses = multiscale_nce(f1, f2)
    assert f1.r1.dtype == torch.bfloat16
    for name, value in losses.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), name
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in encoder.parameters() if p.grad is not None)


def test_loss_decreases_on_a_fixed_batch():
    encoder = Encoder(EncoderConfig(image_size=32, ndf=8, n_rkhs=64, n_depth=1))
    optimiser = torch.optim.Adam(encoder.parameters(), lr=3e-3)
    x1, x2 = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    locations = (torch.randint(0, 25, (8,)), torch.randint(0, 25, (8,)))
    history = []
    for _ in range(20):
        optimiser.zero_grad()
        loss = sum(multiscale_nce(encoder(x1), encoder(x2), source_locations=locations).values())
        loss.backward()
        optimiser.step()
        history.append(loss.item())
    assert history[-1] < 0.7 * history[0], history


def large_features(scale=3.0):
    """Features whose raw dot products overflow fp16 (image 0 is 20x larger than the others),
    while the scores scaled by 1/sqrt(D) stay inside its range."""
    f = Features(torch.randn(4, 256, 1, 1) * scale, torch.randn(4, 256, 5, 5) * scale,
                 torch.randn(4, 256, 7, 7) * scale)
    for maps in f:
        maps[0] *= 20
    return f


@pytest.mark.parametrize("dtype,rtol", [(torch.float16, 1e-3), (torch.bfloat16, 1e-2)])
def test_large_scores_finite_under_fp16_and_bf16_autocast(dtype, rtol):
    f1, f2 = large_features(), large_features()
    raw = f1.r1.flatten(1) @ f2.r7.flatten(2).transpose(0, 1).flatten(1)  # (B, B*49) raw dots
    assert raw.abs().max() > torch.finfo(torch.float16).max  # the case that used to give inf
    locations = (torch.randint(0, 25, (4,)), torch.randint(0, 25, (4,)))
    expected = multiscale_nce(f1, f2, source_locations=locations)
    low = [Features(*(t.to(dtype).requires_grad_() for t in f)) for f in (f1, f2)]
    with torch.autocast("cpu", dtype=dtype):
        losses = multiscale_nce(*low, source_locations=locations)
    for name in NAMES:
        assert torch.isfinite(losses[name]), name
        assert losses[name].item() == pytest.approx(expected[name].item(), rel=rtol), name
    objective(losses).backward()
    assert all(torch.isfinite(t.grad).all() for f in low for t in f)


def test_objective_is_the_sum_of_the_named_terms():
    f = Features(torch.randn(3, 8, 1, 1), torch.randn(3, 8, 5, 5), torch.randn(3, 8, 7, 7))
    losses = multiscale_nce(f, f)
    total = losses["loss_1t5"] + losses["loss_1t7"] + losses["loss_5t5"] + losses["score_reg"]
    losses["diagnostic"] = torch.tensor(100.0)  # not a loss term: must not be minimised
    assert torch.equal(objective(losses), total)


def test_model_loss_ignores_extra_nce_outputs(monkeypatch):
    model = AMDIM(preset("digits", ndf=8, n_rkhs=64, n_depth=1), n_classes=0)
    x1, x2, labels = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), torch.zeros(4).long()
    locations = (torch.randint(0, 25, (4,)), torch.randint(0, 25, (4,)))
    plain = model.nce

    def nce_with_diagnostic(*args):
        return {**plain(*args), "diagnostic": torch.tensor(100.0)}

    monkeypatch.setattr(model, "nce", nce_with_diagnostic)
    out = model(x1, x2, labels, locations)
    assert torch.equal(out["loss"], objective(out))
