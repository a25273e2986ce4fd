"""The compute paths of evaluate, extract, plot --tsne and segment on fake CUDA tensors.

FakeTensorMode makes `cuda` tensors on a machine without a GPU and tracks their device, dtype
and shape without computing: an op that mixes a CPU tensor into CUDA ones raises
FakeTensorDeviceMismatchError, and a read of a value on the host (.item(), int(t), bool(t))
raises DataDependentOutputException. HostCopies also records every copy from CUDA to the CPU.
So these tests pass only if each path keeps to one device, and the training loops never wait
for the GPU. (DataLoaders seed themselves with .item(), so the batches here are lists.)
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from amdim.config import EncoderConfig
from amdim.data.batches import EvalBatches
from amdim.data.datasets import STATS
from amdim.data.device_images import ImageCache
from amdim.evaluation import classifier_training as evaluate, extract, segment
from amdim.model.classifiers import Probes, knn_scores, train_epoch
from amdim.model.encoder import Encoder
from amdim.model.mixture import MixtureHead
from amdim.views.batch_views import BatchEvaluation, BatchViews

TINY = EncoderConfig(image_size=32, ndf=8, n_rkhs=64, n_depth=1, use_bn=True)
CUDA = torch.device("cuda")


class HostCopies(TorchDispatchMode):
    """Records the ops that take a CUDA tensor and give a CPU one (a device-to-host copy)."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        devices = lambda tree: {t.device.type for t in tree_leaves(tree)  # noqa: E731
                                if isinstance(t, torch.Tensor)}
        if "cuda" in devices((args, kwargs)) and "cpu" in devices(out):
            self.copies.append(str(func))
        return out


@pytest.fixture
def fake_cuda(monkeypatch):
    """Fake CUDA with autocast enabled on it (autocast turns itself off without a driver)."""
    monkeypatch.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    with FakeTensorMode(allow_non_fake_inputs=True), HostCopies() as copies:
        yield copies


def on_cuda(build):
    """build() run for real on the CPU, then moved to fake CUDA (modules made inside the fake
    mode hold fake CPU parameters, which Module.to cannot replace)."""
    with unset_fake_temporarily():
        module = build()
    return module.to(CUDA)


def cuda_encoder() -> Encoder:
    """A tiny encoder on fake CUDA, prepared as the commands prepare it."""
    with unset_fake_temporarily():
        encoder = Encoder(TINY)
    return extract.frozen(encoder, CUDA)  # channels-last, eval mode


def cpu_batches(n_batches=2, batch=4, size=32):
    return [(torch.randn(batch, 3, size, size), torch.arange(batch)) for _ in range(n_batches)]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_extract_and_tsne_features_from_cpu_batches(fake_cuda, precision):
    encoder = cuda_encoder()  # evaluate, extract and plot --tsne all prepare it with frozen()
    assert next(encoder.parameters()).is_contiguous(memory_format=torch.channels_last)
    saved = extract.encode(encoder, cpu_batches(), precision, maps=True, out="cpu")
    assert {k: (v.device.type, v.dtype) for k, v in saved.items()} == {
        "features": ("cpu", torch.float32), "labels": ("cpu", torch.int64),
        "r5": ("cpu", torch.float32), "r7": ("cpu", torch.float32)}
    assert saved["r5"].shape == (8, 64, 5, 5)
    kept = extract.encode(encoder, cpu_batches(), precision)  # evaluate: kept on the device
    assert kept["features"].device.type == "cuda" and kept["features"].dtype == torch.float32
    assert extract.embed(encoder, torch.randn(2, 3, 32, 32)).device.type == "cuda"
    if precision == "bf16":  # autocast really is on for the frozen encoder
        features = extract.encode_batch(encoder, torch.randn(2, 3, 32, 32), "bf16")
        assert features.r1.dtype == torch.bfloat16


def test_evaluate_device_path_features_and_knn(fake_cuda):
    encoder = cuda_encoder()
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8, device=CUDA)
    cache = ImageCache(images, torch.arange(10, device=CUDA) % 3)
    batches = EvalBatches(cache, BatchEvaluation(32, *STATS["cifar10"]), batch_size=4)
    features = extract.encode(encoder, batches, "bf16")
    scores = knn_scores(features["features"], features["labels"], features["features"],
                        n_classes=3, k=5)
    assert scores.device.type == "cuda" and scores.shape == (10, 3)
    view = evaluate.FlippedView(BatchViews(32, *STATS["cifar10"]))(images[:4])  # mode "full"
    assert view.device.type == "cuda" and view.shape == (4, 3, 32, 32)
    assert fake_cuda.copies == []


@pytest.mark.parametrize("mode", ["features", "full"])
def test_classifier_steps_stay_on_the_device_without_host_syncs(fake_cuda, monkeypatch, mode):
    encoder = cuda_encoder()
    probes = on_cuda(lambda: Probes(64, 3))
    optimizer = torch.optim.Adam(probes.parameters(), lr=2e-4, fused=True)  # as train_probes

    # the autograd engine needs a real CUDA device: stand in for backward with gradients of
    # the parameters' device and shape (backward cannot move them: it follows the forward)
    def backward(loss, *args, **kwargs):
        assert loss.device.type == "cuda"
        for parameter in probes.parameters():
            parameter.grad = torch.zeros_like(parameter)

    monkeypatch.setattr(torch.Tensor, "backward", backward)
    if mode == "features":  # cached features on the device
        batches = [(torch.randn(4, 64, device=CUDA), torch.randint(0, 3, (4,), device=CUDA))
                   for _ in range(3)]
    else:  # each augmented batch through the frozen encoder, as evaluate's augmented_batches
        batches = [(extract.encode_batch(encoder, images, "bf16").r1.flatten(1).float(),
                    labels.to(CUDA)) for images, labels in cpu_batches(3)]
    loss = train_epoch(probes, optimizer, batches)  # three steps: any .item() raises
    assert loss.device.type == "cuda" and loss.shape == ()
    logits_mlp, logits_linear = probes.eval()(batches[0][0])
    assert logits_mlp.device.type == logits_linear.device.type == "cuda"
    assert fake_cuda.copies == []


def test_segment_maps_on_the_device_drawn_on_the_cpu(fake_cuda):
    encoder = cuda_encoder()
    head = on_cuda(lambda: MixtureHead(64, 3))
    maps = segment.posterior_maps(encoder, head, torch.randn(4, 3, 32, 32))  # CPU images in
    assert {k: (v.device.type, tuple(v.shape)) for k, v in maps.items()} == {
        "r5": ("cpu", (4, 3, 5, 5)), "r7": ("cpu", (4, 3, 7, 7))}
    pictures = segment.pictures(torch.randn(4, 3, 32, 32, device=CUDA), (0.5,) * 3, (0.2,) * 3)
    assert pictures.device.type == "cpu" and pictures.shape == (4, 32, 32, 3)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_pretraining_forward_and_sums_on_fake_cuda(fake_cuda, precision):
    """amdim pretrain's and amdim benchmark's step up to the backward (which fake CUDA cannot
    run): the model channels-last under autocast, its outputs summed on the device."""
    from amdim.config import preset
    from amdim.model.amdim import AMDIM
    from amdim.runtime import autocast_for
    from amdim.training.step import EpochSums, step_values

    cfg = preset("digits", ndf=8, n_rkhs=64, n_depth=1, batch_size=4, precision=precision)
    model = on_cuda(lambda: AMDIM(cfg, 10).to(memory_format=torch.channels_last))
    x = torch.randn(4, 3, 32, 32, device=CUDA).contiguous(memory_format=torch.channels_last)
    sums = EpochSums(CUDA)
    for _ in range(2):
        with autocast_for(precision, CUDA)():
            out = model(x, x, torch.arange(4, device=CUDA))
        sums.add(step_values(out, torch.isfinite(out["loss"]).float()))
    assert sums.sums.device.type == "cuda" and not fake_cuda.copies
