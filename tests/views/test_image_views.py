import numpy as np
import pytest
import torch
from PIL import Image

from amdim.data.datasets import STATS
from amdim.views.image_views import RandomTranslateWithReflect, TwoViews, evaluation_transform


def authors_translate(image: Image.Image, dx: int, dy: int) -> Image.Image:
    """The authors' RandomTranslateWithReflect (amdim-public datasets.py) for a given shift:
    mirrored copies pasted around the image, then a crop."""
    px, py = abs(dx), abs(dy)
    w, h = image.size
    lr, tb = image.transpose(Image.FLIP_LEFT_RIGHT), image.transpose(Image.FLIP_TOP_BOTTOM)
    both = image.transpose(Image.ROTATE_180)
    canvas = Image.new("RGB", (w + 2 * px, h + 2 * py))
    canvas.paste(image, (px, py))
    canvas.paste(lr, (px + w - 1, py))
    canvas.paste(lr, (px - w + 1, py))
    canvas.paste(tb, (px, py + h - 1))
    canvas.paste(tb, (px, py - h + 1))
    for x in (px - w + 1, px + w - 1):
        for y in (py - h + 1, py + h - 1):
            canvas.paste(both, (x, y))
    return canvas.crop((px - dx, py - dy, px + w - dx, py + h - dy))


def test_translation_equals_the_authors(monkeypatch):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8))
    for dx in range(-4, 5):
        for dy in range(-4, 5):
            monkeypatch.setattr(torch, "randint", lambda *a, **k: torch.tensor([dx, dy]))
            ours = RandomTranslateWithReflect(4)(image)
            assert np.array_equal(np.asarray(ours), np.asarray(authors_translate(image, dx, dy)))


@pytest.mark.parametrize("size", [32, 64, 128])
def test_views_and_evaluation_shapes(size):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (size + 10, size, 3), np.uint8))
    x1, x2 = TwoViews(size, *STATS["imagenet"])(image)
    assert x1.shape == x2.shape == (3, size, size) and not torch.equal(x1, x2)
    first = evaluation_transform(size, *STATS["imagenet"])(image)
    assert torch.equal(first, evaluation_transform(size, *STATS["imagenet"])(image))


def test_flip_is_shared_by_both_views():
    # a left-right ramp: with no other augmentation the two views are identical, flipped or not
    ramp = np.tile(np.arange(0, 256, 8, dtype=np.uint8)[None, :, None], (32, 1, 3))
    views = TwoViews(32, (0, 0, 0), (1, 1, 1))
    views.augment.transforms = views.augment.transforms[-1:]  # keep only to-tensor
    flips = set()
    for _ in range(20):
        x1, x2 = views(Image.fromarray(ramp))
        assert torch.equal(x1, x2)
        flips.add(bool(x1[0, 0, 0] > x1[0, 0, -1]))
    assert flips == {True, False}
