"""The Fast AutoAugment ImageNet policy and the other --augment policies: the table is the
published one, each operation's magnitude mapping is fast-autoaugment's, each batched operation
equals the PIL one it mirrors, and the views and presets that use them."""
import numpy as np
import pytest
import torch
from PIL import Image

from amdim.config import PRESETS, PretrainConfig, preset
from amdim.views import augment as A, batch_policy as P
from amdim.views.faa_imagenet import FAA_IMAGENET
from amdim.views.image_views import TwoViews, augmentation

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def colour_images(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Smooth, colourful uint8 images (n, 3, H, W)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * (0.35 + 0.65 * torch.rand(n, 1, 1, 1, generator=g))
    images = torch.nn.functional.interpolate(coarse, (height, width), mode="bilinear")
    return (images * 255).round().to(torch.uint8)


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def test_the_table_is_the_published_imagenet_policy():
    # kakaobrain/fast-autoaugment archive.py fa_reduced_imagenet(): 498 sub-policies of 2 steps
    assert len(FAA_IMAGENET) == 498
    assert all(len(p) == 2 and all(len(step) == 3 for step in p) for p in FAA_IMAGENET)
    assert FAA_IMAGENET[0] == [["ShearY", 0.14143816458479197, 0.513124791615952],
                               ["Sharpness", 0.9290316227291179, 0.9788406212603302]]
    assert FAA_IMAGENET[67] == [["Color", 0.6473605933679651, 0.7903409763232029],
                                ["ShearX", 0.588080941572581, 0.27223524148254086]]
    assert ["Rotate", 7.870457075154214e-05, 0.8086950025500952] in (s for p in FAA_IMAGENET
                                                                    for s in p)
    assert FAA_IMAGENET[-1] == [["AutoContrast", 0.5404508567155423, 0.7472387762067986],
                                ["Equalize", 0.05649876539221024, 0.5628180219887216]]
    assert {s[0] for p in FAA_IMAGENET for s in p} == set(A.FAA_RANGES)  # all 15 operations
    assert all(0 <= s[1] <= 1 and 0 <= s[2] <= 1 for p in FAA_IMAGENET for s in p)


@pytest.mark.parametrize("name,level,expected", [
    ("ShearX", 0.0, -0.3), ("ShearY", 1.0, 0.3), ("TranslateX", 0.5, 0.0),
    ("TranslateY", 1.0, 0.45), ("Rotate", 0.75, 15.0), ("Solarize", 0.5, 128.0),
    ("Posterize", 0.0, 4.0), ("Posterize", 1.0, 8.0), ("Contrast", 0.5, 1.0),
    ("Color", 0.0, 0.1), ("Brightness", 1.0, 1.9), ("Sharpness", 0.25, 0.55),
    ("Cutout", 1.0, 0.2), ("AutoContrast", 0.3, 0.3)])
def test_magnitude_mapping_is_fast_autoaugments(name, level, expected):
    # apply_augment: level * (high - low) + low over augment_list's ranges
    assert A.magnitude(name, level) == pytest.approx(expected)


@pytest.mark.parametrize("name", P.OPERATIONS)
def test_each_batched_operation_equals_pil(name):
    images = colour_images(6, 40, 48, seed=3)
    height, width = 40, 48
    for level in (0.1, 0.5, 0.93):
        for sign in ((1, -1) if name in A.MIRRORED else (1,)):
            value = sign * A.magnitude(name, level)
            if name == "Cutout":
                side, u, v = value * width, 0.3, 0.6
                x0, y0 = int(max(0, u * width - side / 2)), int(max(0, v * height - side / 2))
                box = [x0, y0, int(min(width, x0 + side)), int(min(height, y0 + side)), 0, 0]
                arguments = torch.tensor(box, dtype=torch.float32).expand(6, 6)
                expected = [A.cutout(to_pil(x), side, u, v) for x in images]
            else:
                row = (P.affine_coefficients(name, value, height, width) if name in P.AFFINE
                       else [value, 0, 0, 0, 0, 0])
                arguments = torch.tensor(row, dtype=torch.float32).expand(6, 6)
                expected = [A.apply_operation(to_pil(x), name, value) for x in images]
            expected = torch.from_numpy(np.stack([np.array(e) for e in expected]))
            got = P.apply(name, images.float(), arguments)
            difference = (got - expected.permute(0, 3, 1, 2).float()).abs()
            # equal but for rounding: AutoContrast's LUT and Color's grey level by 1, a few
            # rotated pixels that fall on the other side of a pixel boundary
            assert difference.max() <= 1 or (name == "Rotate" and (difference > 1).float()
                                             .mean() < 0.002), (name, value, difference.max())


def test_the_policy_draws_sub_policies_uniformly_and_steps_with_their_probability():
    policy = P.BatchFastAutoAugment(seed=0)
    n = 20000
    index, arguments, groups = policy.draw(n, 32, 32)
    applied = sum(end - start for _, _, start, end in groups)
    expected = n * sum(s[1] for p in FAA_IMAGENET for s in p) / len(FAA_IMAGENET)
    assert abs(applied - expected) < 4 * np.sqrt(n * 2 * 0.25)
    # each image is in at most one group per step
    for step in (0, 1):
        members = torch.cat([index[a:b] for s, _, a, b in groups if s == step])
        assert len(members) == len(set(members.tolist()))


def test_lighting_shifts_each_image_along_imagenets_principal_components():
    torch.manual_seed(0)
    lighting, image = A.Lighting(), torch.full((3, 4, 4), 0.5)
    shifts = torch.stack([(lighting(image) - image)[:, 0, 0] for _ in range(4000)])  # (N, 3)
    eigvec, eigval = torch.tensor(A.PCA_EIGVEC), torch.tensor(A.PCA_EIGVAL)
    covariance = eigvec @ torch.diag((0.1 * eigval) ** 2) @ eigvec.T
    torch.testing.assert_close(shifts.T.cov(), covariance, atol=2e-5, rtol=0.1)
    assert shifts.mean(0).abs().max() < 4 * 0.1 * 0.2175 / np.sqrt(4000)


def test_paper_views_are_the_default_and_unchanged():
    image = to_pil(colour_images(1, 96, 96)[0])
    for size in (32, 64, 128):
        torch.manual_seed(0)
        default = TwoViews(size, MEAN, STD)(image)
        torch.manual_seed(0)
        paper = TwoViews(size, MEAN, STD, "paper")(image)
        assert all(torch.equal(a, b) for a, b in zip(default, paper))


@pytest.mark.parametrize("augment", ["imagenet-faa", "randaugment", "trivialaugment"])
def test_every_policy_builds_views_of_every_size(augment):
    image = to_pil(colour_images(1, 96, 80)[0])
    torch.manual_seed(0)
    for size in (32, 64, 128):
        views = TwoViews(size, MEAN, STD, augment)
        for _ in range(5):
            one, two = views(image)
            assert one.shape == two.shape == (3, size, size) and torch.isfinite(one).all()
    crop = augmentation(64, MEAN, STD, augment).transforms[0]
    assert crop.scale == ((0.2, 0.9) if augment == "imagenet-faa" else (0.3, 1.0))
    with pytest.raises(ValueError, match="augment must be one of"):
        augmentation(64, MEAN, STD, "autoaugment")


def test_presets_name_the_68_percent_recipe():
    paper = preset("imagenet-paper")
    assert (paper.ndf, paper.n_rkhs, paper.n_depth, paper.image_size) == (320, 2560, 10, 128)
    assert (paper.augment, paper.epochs, paper.lr_milestones) == ("imagenet-faa", 100, (60, 90))
    assert all(preset(name).augment == "paper" for name in PRESETS if name != "imagenet-paper")
    assert preset("stl10").batch_size == 480  # the authors' advice for CIFAR and STL-10
    with pytest.raises(ValueError, match="augment must be"):
        PretrainConfig(augment="autoaugment")
    with pytest.raises(ValueError, match="loader"):
        PretrainConfig(augment="randaugment", data_path="device")


def test_batched_policy_draws_follow_the_generators_seed():
    from amdim.views.batch_views import BatchViews
    images = colour_images(8, 40, 40)
    views = BatchViews(32, MEAN, STD, augment="imagenet-faa")
    first = views(images, torch.Generator().manual_seed(3))
    again = BatchViews(32, MEAN, STD, augment="imagenet-faa", seed=99)(
        images, torch.Generator().manual_seed(3))  # a fresh object: the same draws
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    generator = torch.Generator().manual_seed(3)
    one, two = views(images, generator), views(images, generator)  # not reseeded: new draws
    assert not torch.equal(one[0], two[0])
