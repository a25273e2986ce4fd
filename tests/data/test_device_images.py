"""The device-resident data path: decoding into the cache, shuffled training batches with
exact resume, in-order evaluation batches, and the memory check."""
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets

from amdim.data.batches import EvalBatches, TrainBatches
from amdim.data.datasets import ArrayImages, digits
from amdim.data.device_images import (ImageCache, cache_bytes, cache_dataset, fits_in_memory,
                                      load_npz)
from amdim.data.image_files import DataError
from amdim.views.batch_views import BatchEvaluation, BatchViews
from amdim.views.image_views import TwoViews

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def write_npz(path, sizes, quality=90):
    """The compact format of shared/data: JPEG streams end to end, offsets, labels, classes."""
    rng = np.random.default_rng(0)
    streams = []
    for height, width in sizes:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
        streams.append(np.frombuffer(buffer.getvalue(), np.uint8))
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in streams])]).astype(np.int64)
    np.savez_compressed(path, jpeg=np.concatenate(streams), offsets=offsets,
                        labels=(np.arange(len(sizes)) % 3).astype(np.int16),
                        classes=np.array(["cat", "dog", "emu"]))
    return path


def readme_loader(path):
    """The reference loader of shared/data/README.md."""
    d = np.load(path)
    j, o, y = d["jpeg"], d["offsets"], d["labels"].astype(np.int64)
    x = np.stack([np.asarray(Image.open(io.BytesIO(j[o[i]:o[i + 1]])).convert("RGB"))
                  for i in range(len(y))])
    return x, y, list(d["classes"])


def test_load_npz_equals_the_reference_loader(tmp_path):
    path = write_npz(tmp_path / "tiny.npz", [(24, 20)] * 1100)  # > one decoding chunk
    cache = load_npz(path, workers=2)
    images, labels, classes = readme_loader(path)
    assert cache.images.shape == (1100, 3, 24, 20) and cache.images.dtype == torch.uint8
    assert torch.equal(cache.images, torch.from_numpy(images).permute(0, 3, 1, 2))
    assert torch.equal(cache.labels, torch.from_numpy(labels))
    assert cache.labels.dtype == torch.int64 and list(cache.classes) == classes
    assert cache.nbytes == cache_bytes(1100, 24, 20)


def test_npz_problems_are_explained(tmp_path):
    mixed = write_npz(tmp_path / "mixed.npz", [(16, 16), (16, 16), (20, 16)])
    with pytest.raises(DataError, match="image 2 is 16x20 px but image 0 is 16x16.*one size"):
        load_npz(mixed)
    np.savez(tmp_path / "bad.npz", jpeg=np.zeros(3, np.uint8))
    with pytest.raises(DataError, match=r"lacks the arrays \['offsets', 'labels'\]"):
        load_npz(tmp_path / "bad.npz")
    with pytest.raises(DataError, match="does not exist"):
        load_npz(tmp_path / "missing.npz")


def test_cache_dataset_takes_decoded_arrays_as_they_are():
    images, labels = digits("test")
    views = TwoViews(32, MEAN, STD)
    dataset = ArrayImages(images, labels, transform=views)  # as data.build_datasets gives it
    cache = cache_dataset(dataset)
    assert dataset.transform is views
    assert torch.equal(cache.images, torch.from_numpy(images).permute(0, 3, 1, 2))
    assert torch.equal(cache.labels, torch.from_numpy(labels.astype(np.int64)))
    # the same as reading each image back through PIL (a Subset hides the arrays)
    plain = ArrayImages(images, labels, transform=lambda image: image)
    decoded = cache_dataset(torch.utils.data.Subset(plain, range(len(plain))))
    assert torch.equal(decoded.images, cache.images) and torch.equal(decoded.labels, cache.labels)


def test_cache_dataset_reads_an_image_folder_bypassing_its_transform(tmp_path):
    for i, name in enumerate(["a", "a", "b"]):
        (tmp_path / name).mkdir(exist_ok=True)
        Image.new("RGB", (12, 10), (i * 50, 0, 0)).save(tmp_path / name / f"{i}.png")
    views = TwoViews(32, MEAN, STD)
    dataset = datasets.ImageFolder(str(tmp_path), transform=views)
    cache = cache_dataset(dataset)
    assert dataset.transform is views
    assert cache.images.shape == (3, 3, 10, 12) and cache.labels.tolist() == [0, 0, 1]
    assert cache.images[2, 0].unique().tolist() == [100] and cache.classes == ("a", "b")


def test_cache_dataset_refuses_transformed_items():
    class Tensors(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.zeros(3, 8, 8), 0

    with pytest.raises(DataError, match="transform=None"):
        cache_dataset(Tensors())


def small_cache(n=50, size=32):
    """Images whose first pixel is their index, labels equal to their index."""
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
    images[:, :, 0, 0] = torch.arange(n, dtype=torch.uint8)[:, None]
    return ImageCache(images, torch.arange(n))


def take(batches, k=None):
    return [(v1.clone(), v2.clone(), y.clone()) for (v1, v2), y in
            (batch for i, batch in zip(range(k or len(batches)), batches))]


def test_train_batches_shuffle_each_epoch_and_repeat_from_the_seed():
    cache = small_cache()
    batches = TrainBatches(cache, BatchViews(32, MEAN, STD), batch_size=16, seed=3)
    assert len(batches) == 3  # 50 // 16, the partial batch dropped
    first = take(batches)
    second = take(batches)  # iterating again serves the next epoch
    seen = torch.cat([y for _, _, y in first])
    assert len(seen.unique()) == 48 and seen.max() < 50
    assert not torch.equal(seen, torch.cat([y for _, _, y in second]))
    assert all(v1.shape == (16, 3, 32, 32) and v1.dtype == torch.float32 for v1, _, _ in first)
    again = TrainBatches(cache, BatchViews(32, MEAN, STD), batch_size=16, seed=3)
    for a, b in zip(first, take(again)):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_train_batches_resume_exactly_mid_epoch():
    cache = small_cache()
    run = TrainBatches(cache, BatchViews(32, MEAN, STD), batch_size=8, seed=1)
    run.set_epoch(2)
    full = take(run)
    resumed = TrainBatches(cache, BatchViews(32, MEAN, STD), batch_size=8, seed=1)
    resumed.set_epoch(2, 2)  # two batches taken before the "crash"
    assert len(take(resumed)) == len(full) - 2
    resumed.set_epoch(2, 2)
    for a, b in zip(full[2:], take(resumed)):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_ranks_split_each_global_batch():
    cache = small_cache()
    whole = take(TrainBatches(cache, BatchViews(32, MEAN, STD), batch_size=8, seed=1))
    parts = [take(TrainBatches(cache, BatchViews(32, MEAN, STD), 8, seed=1, rank=r,
                               world_size=2)) for r in range(2)]
    for k, (_, _, labels) in enumerate(whole):
        assert torch.equal(torch.cat([parts[0][k][2], parts[1][k][2]]), labels)


def test_eval_batches_are_in_order_and_complete():
    cache = small_cache(size=96)
    transform = BatchEvaluation(64, MEAN, STD)
    batches = EvalBatches(cache, transform, batch_size=16)
    out = list(batches)
    assert len(batches) == len(out) == 4 and len(out[-1][1]) == 2
    assert torch.equal(torch.cat([y for _, y in out]), torch.arange(50))
    assert torch.equal(torch.cat([x for x, _ in out]), transform(cache.images))
    assert out[0][0].shape == (16, 3, 64, 64)


def test_bad_batches_are_explained():
    with pytest.raises(DataError, match="fewer than one batch"):
        TrainBatches(small_cache(10), BatchViews(32, MEAN, STD), batch_size=16)
    with pytest.raises(ValueError, match="divisible by world_size"):
        TrainBatches(small_cache(), BatchViews(32, MEAN, STD), batch_size=9, world_size=2)
    with pytest.raises(ValueError, match="uint8"):
        ImageCache(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.int64))


def test_fits_in_memory():
    # on a CPU: a quarter of the available RAM (CIFAR-10's 150 MB fit, 3 TB do not)
    assert fits_in_memory(50_000, 32, "cpu") and not fits_in_memory(10**9, 32, "cpu")
    assert fits_in_memory(10**9, 32, "cpu", force=True)
    assert not fits_in_memory(50_000, 32, "meta")
    assert cache_bytes(50_000, 32, 32) == 50_000 * (3 * 32 * 32 + 8)


@pytest.mark.gpu
def test_cuda_cache_and_batches():
    free, _ = torch.cuda.mem_get_info()
    assert fits_in_memory(1000, 32, "cuda") and not fits_in_memory(int(free), 32, "cuda")
    cache = cache_dataset(ArrayImages(*digits("test"), transform=None), device="cuda")
    batches = TrainBatches(cache, BatchViews(32, MEAN, STD), batch_size=64, seed=0)
    (view1, view2), labels = next(iter(batches))
    assert view1.device.type == labels.device.type == "cuda" and view1.shape == (64, 3, 32, 32)
    images, _ = next(iter(EvalBatches(cache, BatchEvaluation(32, MEAN, STD), 64)))
    assert images.device.type == "cuda"


def test_sixteen_bit_images_are_cached_scaled_not_white():
    ramp = Image.fromarray((np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16))
    cache = cache_dataset([(ramp, 0)])  # PIL's convert("RGB") clipped every pixel to 255
    assert cache.images.shape == (1, 3, 8, 8) and cache.images.min() == 0
    assert 240 < int(cache.images.max()) < 255 and len(cache.images.unique()) > 50
