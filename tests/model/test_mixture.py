import math

import pytest
import torch

from amdim import Encoder, EncoderConfig, Features, multiscale_nce
from amdim.model.mixture import MixtureHead, assignments, mixture_nce_task, multiscale_mixture_nce
from amdim.model.nce import nce_task

NAMES = ("loss_1t5", "loss_1t7", "loss_5t5", "score_reg")


def random_features(batch=4, dim=16, scale=3.0):
    return Features(torch.randn(batch, dim, 1, 1) * scale, torch.randn(batch, dim, 5, 5) * scale,
                    torch.randn(batch, dim, 7, 7) * scale)


def naive_mixture_task(sources, target, tclip, alpha):
    """The section 3.7 objective as loops in float64: per-component NCE log-softmax s_j, the
    posterior q = softmax(s / alpha), and sum_j q_j s_j + alpha * H(q) per location."""
    batch, n_mix, dim = sources.shape
    target = target.flatten(2).double()  # (B, D, L)
    raw = torch.einsum("ikd,jdl->ikjl", sources.double(), target) / math.sqrt(dim)
    score_reg = 0.05 * (raw ** 2).mean()
    s = tclip * torch.tanh(raw / tclip)
    total, count = 0.0, 0
    posterior = torch.zeros(batch, n_mix, target.shape[2], dtype=torch.float64)
    for i in range(batch):
        for loc in range(s.shape[3]):
            log_probs = []
            for k in range(n_mix):
                negatives = torch.cat([s[i, k, j] for j in range(batch) if j != i])
                logits = torch.cat([s[i, k, i, loc:loc + 1], negatives])
                log_probs.append(torch.log_softmax(logits, 0)[0])
            log_probs = torch.stack(log_probs)
            q = torch.softmax(log_probs / alpha, 0)
            objective = (q * log_probs).sum() - alpha * (q * q.log()).sum()
            # the softmax posterior is the optimum: a uniform one does no better
            uniform = torch.full_like(q, 1 / n_mix)
            assert objective >= (uniform * log_probs).sum() + alpha * math.log(n_mix) - 1e-9
            posterior[i, :, loc] = q
            total += -objective
            count += 1
    return total / count, score_reg, posterior


@pytest.mark.parametrize("n_mix,alpha", [(1, 0.5), (3, 1.0), (4, 0.25)])
def test_task_matches_naive_loop(n_mix, alpha):
    sources, target = torch.randn(4, n_mix, 16) * 3, torch.randn(4, 16, 5, 5) * 3
    loss, score_reg, q = mixture_nce_task(sources, target, tclip=5.0, alpha=alpha)
    expected_loss, expected_reg, expected_q = naive_mixture_task(sources, target, 5.0, alpha)
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-5)
    assert score_reg.item() == pytest.approx(expected_reg.item(), rel=1e-5)
    assert q.shape == (4, n_mix, 5, 5) and not q.requires_grad
    torch.testing.assert_close(q.double().flatten(2), expected_q, rtol=1e-5, atol=1e-6)


def test_single_component_task_is_nce_task_exactly():
    source, target = torch.randn(6, 32) * 3, torch.randn(6, 32, 7, 7) * 3
    loss, score_reg, q = mixture_nce_task(source[:, None], target, tclip=5.0, alpha=0.3)
    expected = nce_task(source, target, tclip=5.0)
    assert torch.equal(loss, expected[0]) and torch.equal(score_reg, expected[1])
    assert torch.equal(q, torch.ones(6, 1, 7, 7))


def test_single_component_multiscale_is_multiscale_nce_exactly():
    f1, f2 = random_features(), random_features()
    locations = (torch.randint(0, 25, (4,)), torch.randint(0, 25, (4,)))
    identity = MixtureHead(16, 1)
    torch.nn.init.zeros_(identity.output.weight)  # f1^1 = f1 exactly
    expected = multiscale_nce(f1, f2, tclip=5.0, source_locations=locations)
    for head in (None, identity):
        losses = multiscale_mixture_nce(f1, f2, head, tclip=5.0, alpha=0.5,
                                        source_locations=locations)
        assert set(losses) == set(NAMES)
        for name in NAMES:
            assert torch.equal(losses[name], expected[name]), (head, name)
    # locations drawn inside: the same draws from the same seed
    torch.manual_seed(3)
    drawn = multiscale_mixture_nce(f1, f2, identity, tclip=5.0)
    torch.manual_seed(3)
    assert all(torch.equal(drawn[n], v) for n, v in multiscale_nce(f1, f2, tclip=5.0).items())


def test_head_shapes_and_distinct_components():
    head = MixtureHead(16, 3)
    f1 = torch.randn(5, 16)
    mixture = head(f1)
    assert mixture.shape == (5, 3, 16)
    assert (mixture[:, 0] - mixture[:, 1]).abs().max() > 1e-3  # components start different
    with pytest.raises(ValueError):
        mixture_nce_task(mixture, torch.randn(5, 16, 5, 5), tclip=20.0, alpha=0.0)


def test_gradients_reach_head_and_assignments():
    f1, f2 = random_features(), random_features()
    for f in (f1, f2):
        f.r1.requires_grad_(True)
    head = MixtureHead(16, 3)
    losses = multiscale_mixture_nce(f1, f2, head, tclip=5.0, alpha=1.0)
    sum(losses.values()).backward()
    for parameter in head.parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0
    assert f1.r1.grad.abs().sum() > 0
    maps = assignments(f1, f1, head, tclip=5.0, alpha=1.0)
    assert maps["r5"].shape == (4, 3, 5, 5) and maps["r7"].shape == (4, 3, 7, 7)
    torch.testing.assert_close(maps["r7"].sum(1), torch.ones(4, 7, 7))


def tiny_setup(n_mix=3):
    encoder = Encoder(EncoderConfig(image_size=32, ndf=8, n_rkhs=64, n_depth=1))
    head = MixtureHead(64, n_mix)
    x1 = torch.randn(8, 3, 32, 32)
    x2 = x1 + 0.1 * torch.randn_like(x1)
    locations = (torch.randint(0, 25, (8,)), torch.randint(0, 25, (8,)))
    return encoder, head, x1, x2, locations


def test_loss_decreases_with_adam():
    encoder, head, x1, x2, locations = tiny_setup()
    optimiser = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=1e-3)
    history = []
    for _ in range(5):
        losses = multiscale_mixture_nce(encoder(x1), encoder(x2), head, tclip=20.0, alpha=1.0,
                                        source_locations=locations)
        loss = sum(losses.values())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        history.append(loss.item())
    assert history[-1] < history[0] - 0.05, history


def test_finite_under_bf16_autocast():
    encoder, head, x1, x2, locations = tiny_setup()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = multiscale_mixture_nce(encoder(x1), encoder(x2), head, tclip=20.0, alpha=1.0,
                                        source_locations=locations)
        maps = assignments(encoder(x1), encoder(x1), head)
    loss = sum(losses.values())
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())
    assert torch.isfinite(maps["r7"]).all()
