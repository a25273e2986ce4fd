"""The decode data path (data.jpeg_batches) and the sharded device path (batch_order's shards,
batches.TrainBatches sharded), on tiny folders of JPEGs of different sizes."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from amdim.data.batch_order import shard_batch_indices, shard_indices
from amdim.data.batches import EpochBatches, Shard, TrainBatches
from amdim.data.device_images import ImageCache, cache_dataset
from amdim.data.image_files import ImageClasses, DataError
from amdim.data.jpeg_batches import CANVAS_STEP, DecodedBatches, RawImages, decode_batch

CPU = torch.device("cpu")


def photo(height: int, width: int, seed: int) -> Image.Image:
    """A smooth colourful RGB image."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 4, 4, generator=g)
    pixels = torch.nn.functional.interpolate(coarse, (height, width), mode="bilinear")[0]
    return Image.fromarray((pixels.permute(1, 2, 0) * 255).round().byte().numpy())


def jpeg_bytes(image: Image.Image, **options) -> torch.Tensor:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **options)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


@pytest.fixture
def folder(tmp_path):
    """train/<a|b>/ with 12 JPEGs of 4 sizes and one PNG."""
    sizes = [(40, 56), (48, 36), (44, 44), (36, 60)]
    for i in range(12):
        path = tmp_path / "train" / "ab"[i % 2] / f"{i:02d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        photo(*sizes[i % 4], seed=i).save(path, quality=90)
    photo(40, 40, seed=99).save(tmp_path / "train" / "a" / "png.png")
    return tmp_path / "train"


def test_decoded_batch_lays_each_image_at_the_top_left_of_one_canvas():
    images = [photo(40, 56, 0), photo(48, 36, 1)]
    items = [jpeg_bytes(images[0]), torch.from_numpy(np.array(images[1])).permute(2, 0, 1)]
    canvas, sizes = decode_batch(items, CPU)
    assert canvas.shape == (2, 3, CANVAS_STEP * 2, CANVAS_STEP * 2) and canvas.dtype == torch.uint8
    assert sizes.tolist() == [[40, 56], [48, 36]]
    pil = torch.from_numpy(np.array(Image.open(io.BytesIO(items[0].numpy().tobytes()))))
    # libjpeg-turbo in both; IDCT and upsampling may differ by a grey level or two
    difference = (canvas[0, :, :40, :56].float() - pil.permute(2, 0, 1).float()).abs()
    assert difference.mean() < 1.0 and difference.max() <= 8
    assert torch.equal(canvas[1, :, :48, :36], items[1])  # decoded pixels copied as they are
    assert canvas[0, :, 40:].eq(0).all() and canvas[1, :, :, 36:].eq(0).all()
    assert decode_batch(items, CPU, canvas=(50, 60))[0].shape == (2, 3, 50, 60)


def test_jpegs_the_batched_decoder_refuses_are_decoded_by_pil_or_named():
    image = photo(32, 40, 3)
    cmyk = jpeg_bytes(image.convert("CMYK"))
    canvas, sizes = decode_batch([jpeg_bytes(image), cmyk], CPU)
    assert sizes.tolist() == [[32, 40], [32, 40]]
    assert canvas[1].float().mean() > 10  # decoded, not left black
    broken = jpeg_bytes(image)[:20]
    with pytest.raises(DataError, match="does not decode"):
        decode_batch([jpeg_bytes(image), broken], CPU)


def test_raw_items_are_the_stored_bytes_and_non_jpegs_decoded(folder):
    dataset = ImageClasses(folder, transform=lambda image: "views")
    raw = RawImages(dataset)
    data, label = raw[0]
    path, expected_label = dataset.samples[0]
    assert data.dim() == 1 and bytes(data.numpy()) == open(path, "rb").read()
    assert label == expected_label
    png = next(i for i, (p, _) in enumerate(dataset.samples) if p.endswith(".png"))
    assert raw[png][0].shape == (3, 40, 40)
    assert dataset[0][0] == "views"  # the dataset keeps its own transform


class Record:
    """Views that record what they were given: (images, sizes, first random number)."""

    def __call__(self, images, generator, sizes=None):
        draw = torch.rand(1, generator=generator)
        self.last = (images, sizes)
        return images.float().mean((1, 2, 3)) + draw, sizes.float().sum(1)


def batches_of(iterable, n=None):
    out = []
    for (view1, view2), labels in iterable:
        out.append((view1.clone(), view2.clone(), labels.clone()))
        if n is not None and len(out) == n:
            break
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_decoded_batches_follow_the_batch_order_and_resume_exactly(folder, workers):
    dataset = ImageClasses(folder, transform=None)
    labels = [label for _, label in dataset.samples]
    batches = DecodedBatches(dataset, Record(), 4, CPU, seed=3, workers=workers)
    assert len(batches) == 3  # 13 images, batches of 4
    epoch0 = batches_of(batches)
    order = [[i for _, _, i in keys] for keys in EpochBatches(13, 4, 3, 0)]
    assert [b[2].tolist() for b in epoch0] == [[labels[i] for i in row] for row in order]
    epoch1 = batches_of(batches)  # iterating again: the next epoch
    assert [b[2].tolist() for b in epoch1] != [b[2].tolist() for b in epoch0]
    resumed = DecodedBatches(dataset, Record(), 4, CPU, seed=3, workers=0)
    resumed.set_epoch(0, 1)
    for a, b in zip(epoch0[1:], batches_of(resumed)):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_decoded_batches_build_real_views_of_every_size(folder):
    from amdim.views.batch_views import BatchViews

    dataset = ImageClasses(folder, transform=None)
    views = BatchViews(64, (0.5,) * 3, (0.25,) * 3)
    (view1, view2), labels = next(iter(DecodedBatches(dataset, views, 6, CPU)))
    assert view1.shape == view2.shape == (6, 3, 64, 64) and torch.isfinite(view1).all()
    with pytest.raises(DataError, match="fewer than one batch"):
        DecodedBatches(dataset, views, 20, CPU)


def test_shards_split_one_permutation_and_cover_each_epoch():
    shards = [shard_indices(103, seed=5, rank=r, world_size=4) for r in range(4)]
    assert all(len(s) == 25 for s in shards)  # 103 // 4; the remainder is left out
    held = torch.cat(shards)
    assert len(set(held.tolist())) == 100 and held.max() < 103
    assert not torch.equal(shards[0], torch.arange(0, 100, 4))  # shuffled: every class everywhere
    assert torch.equal(shards[1], shard_indices(103, 5, 1, 4))  # fixed for the run
    rows = shard_batch_indices(25, 6, seed=5, epoch=2, rank=1)
    assert rows.shape == (4, 6) and len(set(rows.flatten().tolist())) == 24
    assert not torch.equal(rows, shard_batch_indices(25, 6, 5, 3, 1))
    assert not torch.equal(rows, shard_batch_indices(25, 6, 5, 2, 0))


def test_sharded_train_batches_serve_each_rank_its_own_shard():
    n, world, batch = 40, 2, 8
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2)
    labels = torch.arange(n)
    seen = []
    for rank in range(world):
        keep = shard_indices(n, 7, rank, world)
        cache = ImageCache(images[keep].contiguous(), labels[keep])
        batches = TrainBatches(cache, lambda x, g: (x, x), batch, seed=7, rank=rank,
                               world_size=world, sharded=True)
        assert len(batches) == 5  # 20 images a shard, 4 a rank per batch
        epoch = [b[2] for b in batches_of(batches)]
        assert all(len(b) == batch // world for b in epoch)
        assert sorted(torch.cat(epoch).tolist()) == sorted(keep.tolist())
        seen += torch.cat(epoch).tolist()
        again = TrainBatches(cache, lambda x, g: (x, x), batch, seed=7, rank=rank,
                             world_size=world, sharded=True)
        again.set_epoch(0, 2)
        assert [b[2].tolist() for b in batches_of(again)] == [b.tolist() for b in epoch[2:]]
    assert sorted(seen) == list(range(n))


def test_a_shard_caches_only_its_images():
    from amdim.data.datasets import ArrayImages

    pixels = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1).repeat(3, 3)
    dataset = ArrayImages(pixels, np.arange(10) % 3, transform=lambda image: "views")
    shard = Shard(dataset, torch.tensor([1, 4, 7]))
    cache = cache_dataset(shard)
    assert cache.images[:, 0, 0, 0].tolist() == [1, 4, 7] and cache.labels.tolist() == [1, 1, 1]
    assert shard[1][0] == "views" and shard.transform is dataset.transform


def test_a_run_on_the_decode_path_resumes_exactly(folder):
    from amdim.config import preset
    from amdim.training import checkpoint
    from amdim.training.pretraining import pretrain

    def tiny(run_dir, epochs):
        return preset("digits", data=str(folder.parent), run_dir=str(run_dir), ndf=8,
                      n_rkhs=64, n_depth=1, batch_size=4, steps_per_epoch=2, warmup_steps=2,
                      workers=0, final_probe=False, device="cpu", epochs=epochs)

    root = folder.parent / "runs"
    pretrain(tiny(root / "straight", 2))
    pretrain(tiny(root / "resumed", 1))
    pretrain(tiny(root / "resumed", 2))
    a, b = (checkpoint.load(root / r / "checkpoint.pt") for r in ("straight", "resumed"))
    assert a["data_path"] == b["data_path"] == "decode"  # auto: small images, on a CPU
    assert all(torch.equal(a["encoder"][k], b["encoder"][k]) for k in a["encoder"])


@pytest.mark.gpu
def test_the_gpu_decodes_a_batch_as_the_cpu_does(folder):
    from amdim.views.batch_views import BatchViews

    dataset = ImageClasses(folder, transform=None)
    items = [RawImages(dataset)[i][0] for i in range(len(dataset))]
    cpu, cpu_sizes = decode_batch(items, CPU)
    gpu, gpu_sizes = decode_batch(items, torch.device("cuda"))
    assert torch.equal(cpu_sizes, gpu_sizes.cpu())
    # nvJPEG and libjpeg-turbo may differ by a few grey levels (IDCT, chroma upsampling)
    assert (cpu.float() - gpu.cpu().float()).abs().mean() < 2
    views = BatchViews(64, (0.5,) * 3, (0.25,) * 3, channels_last=True)
    batches = DecodedBatches(dataset, views, 6, torch.device("cuda"), workers=2)
    (view1, view2), labels = next(iter(batches))
    assert view1.is_cuda and labels.is_cuda and view1.shape == (6, 3, 64, 64)
