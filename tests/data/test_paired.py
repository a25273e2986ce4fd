"""Contexts of views from the data: paired folders and arrays, the Lab split, ViewSet."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from amdim.config import preset
from amdim.data.image_files import DataError
from amdim.data.paired import PairedArrays, PairedFolder, view_source, view_sources
from amdim.views.view_sets import ViewSet, rgb_to_lab


def test_rgb_to_lab_matches_known_values():
    # sRGB primaries, white and mid grey in CIE L*a*b* (D65), as published (e.g. Lindbloom's
    # calculator and colormath: red 53.2408, 80.0925, 67.2032)
    rgb = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1], [0, 0, 0],
                        [0.5, 0.5, 0.5]])
    expected = torch.tensor([[53.2408, 80.0925, 67.2032], [87.7347, -86.1827, 83.1793],
                             [32.2970, 79.1875, -107.8602], [100.0, 0, 0], [0, 0, 0],
                             [53.3890, 0, 0]])
    lab = rgb_to_lab(rgb.T[:, :, None])[..., 0].T  # (3, 6, 1) -> (6, 3)
    torch.testing.assert_close(lab, expected, atol=2e-3, rtol=0)
    batch = torch.rand(2, 3, 4, 5)  # batched and per pixel alike
    torch.testing.assert_close(rgb_to_lab(batch)[1, :, 2, 3],
                               rgb_to_lab(batch[1, :, 2:3, 3:4])[:, 0, 0])


def _image(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def paired_folder(root, missing=()):
    """Views rgb (3 channels, 40 px) and depth (1 channel, 20 px) of 3 + 2 contexts in two
    class folders; `missing`: (view, relative path) pairs not written."""
    rng = np.random.default_rng(0)
    for cls, count in (("cat", 3), ("dog", 2)):
        for i in range(count):
            for view, shape in (("rgb", (40, 40, 3)), ("depth", (20, 20))):
                if (view, f"{cls}/{i}.png") not in missing:
                    _image(root / view / cls / f"{i}.png",
                           rng.integers(0, 256, shape, dtype=np.uint8))
    return root


def test_paired_folder_matches_views_and_reports_unmatched_files(tmp_path, caplog):
    root = paired_folder(tmp_path, missing={("depth", "cat/2.png")})
    with caplog.at_level(logging.WARNING, logger="amdim"):
        folder = PairedFolder(root)
    assert "rgb/cat/2.png" in caplog.text and "no match in every view" in caplog.text
    assert folder.unmatched == {"rgb": ["cat/2.png"]}
    assert folder.names == ("depth", "rgb") and folder.channels == (1, 3)
    assert folder.paths == ["cat/0.png", "cat/1.png", "dog/0.png", "dog/1.png"]
    assert folder.classes == ["cat", "dog"] and folder.labels.tolist() == [0, 0, 1, 1]
    (depth, rgb), label = folder[2]
    assert depth.shape == (20, 20, 1) and rgb.shape == (40, 40, 3) and label == 1
    with pytest.raises(DataError, match="rgb/cat/2.png"):
        PairedFolder(root, strict=True)


def test_a_view_file_that_fails_during_the_run_is_named_and_replaced(tmp_path, caplog):
    # as in image folders: warned once, the next context in its place; strict: a DataError
    root = paired_folder(tmp_path)
    folder, strict = PairedFolder(root), PairedFolder(root, strict=True)
    (root / "depth" / "dog" / "1.png").write_bytes(b"not a png")
    with caplog.at_level(logging.WARNING, logger="amdim"):
        views, label = folder[4]
    assert "depth/dog/1.png" in caplog.text and "became unreadable" in caplog.text
    assert views[0].shape == (20, 20, 1) and label == 0  # the next one: cat/0.png
    with pytest.raises(DataError, match=r"depth/dog/1.png.*--strict-data"):
        strict[4]


def test_paired_arrays_views_of_1_and_3_channels(tmp_path):
    path = tmp_path / "pairs_train.npz"
    np.savez(path, view_gray=np.zeros((6, 16, 16), np.uint8),
             view_colour=np.full((6, 48, 32, 3), 255, np.uint8), labels=np.arange(6) % 2)
    arrays = PairedArrays(path)
    assert arrays.names == ("colour", "gray") and arrays.channels == (3, 1)
    assert arrays.classes == ["0", "1"]
    views = ViewSet(arrays, 32, "paired", train=True, view_augment=True)
    assert views.layout == (("colour", 3), ("gray", 1))
    (colour, gray), label = views[3]
    assert colour.shape == (3, 32, 32) and gray.shape == (1, 32, 32) and label == 1
    assert colour.dtype == torch.float32
    np.savez(path, view_a=np.zeros((6, 8, 8), np.uint8), view_b=np.zeros((5, 8, 8), np.uint8))
    with pytest.raises(DataError, match="view_b"):
        PairedArrays(path)
    np.savez(path, view_a=np.zeros((6, 8, 8), np.float32))
    with pytest.raises(DataError, match="at least two view_"):
        PairedArrays(path)


def test_lab_views_and_any_dataset_of_view_tuples():
    class RGB(torch.utils.data.Dataset):  # the Python API: (views tuple, label)
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return (np.full((40, 36, 3), 60 * i, np.uint8),), i

    lab = ViewSet(RGB(), 32, "lab", train=False)
    assert lab.layout == (("L", 1), ("ab", 2))
    (light, colour), label = lab[0]
    assert light.shape == (1, 32, 32) and colour.shape == (2, 32, 32) and label == 0
    torch.testing.assert_close(light, torch.full_like(light, -2.0))  # black: L = 0 -> (0-50)/25
    torch.testing.assert_close(colour, torch.zeros_like(colour), atol=1e-4, rtol=0)

    class TwoViews(RGB):
        def __getitem__(self, i):
            return (np.zeros((8, 8), np.uint8), np.zeros((64, 64, 4), np.uint8)), -1

    views = ViewSet(TwoViews(), 32, "paired", train=False)
    assert views.layout == (("view0", 1), ("view1", 4))
    assert [v.shape for v in views[1][0]] == [(1, 32, 32), (4, 32, 32)]


# -- every source checked as image folders are (issue 24): classes matched across splits,
# labels in range, bad files found and named at build time, --strict-data

def paired_config(data, strict_data=False):
    return preset("digits", data=str(data), views="paired", strict_data=strict_data)


def test_a_test_split_lacking_a_training_class_is_refused(tmp_path):
    # before: test labels were recomputed per split, so test cat (0 there) scored as bird (0)
    paired_folder(tmp_path / "train")
    for view in ("rgb", "depth"):
        _image(tmp_path / "train" / view / "bird" / "0.png", np.zeros((20, 20), np.uint8))
    paired_folder(tmp_path / "test")  # cat and dog only
    with pytest.raises(DataError, match=r"same classes.*only in train/: \['bird'\]"):
        view_sources(paired_config(tmp_path))
    with pytest.raises(DataError, match="same classes"):  # a test split built alone, as evaluate
        view_source(paired_config(tmp_path), "test")


def test_npz_test_labels_outside_the_training_classes_are_refused(tmp_path):
    views = {"view_a": np.zeros((4, 8, 8), np.uint8), "view_b": np.zeros((4, 8, 8, 3), np.uint8)}
    np.savez(tmp_path / "s_train.npz", **views, labels=[0, 1, 0, 1], classes=["x", "y"])
    np.savez(tmp_path / "s_test.npz", **views, labels=[0, 1, 5, 1])  # no classes: numbered
    with pytest.raises(DataError, match=r"s_test.npz.*outside -1..1.*item 2 has label 5"):
        view_sources(paired_config(tmp_path / "s_train.npz"))
    np.savez(tmp_path / "s_train.npz", **views, labels=[0, 1, 0, 7], classes=["x", "y"])
    with pytest.raises(DataError, match=r"s_train.npz.*label 7"):  # within one split too
        PairedArrays(tmp_path / "s_train.npz")


def test_sixteen_bit_views_are_scaled_not_white(tmp_path):
    paired_folder(tmp_path)
    ramp = (np.arange(20 * 20, dtype=np.uint16).reshape(20, 20) * 160).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "depth" / "cat" / "0.png")  # mode I;16
    assert Image.open(tmp_path / "depth" / "cat" / "0.png").mode.startswith("I")
    (depth, _), _ = PairedFolder(tmp_path)[0]
    assert depth.shape == (20, 20, 1) and depth.min() == 0 and 240 < depth.max() < 255
    assert len(np.unique(depth)) > 100  # PIL's convert("L") gave 255 everywhere


def test_a_stray_file_at_a_view_root_is_left_out_with_a_warning(tmp_path, caplog):
    paired_folder(tmp_path)
    for view in ("rgb", "depth"):  # before: the whole set became unlabelled, probes off
        _image(tmp_path / view / "notes.png", np.zeros((8, 8), np.uint8))
    with caplog.at_level(logging.WARNING, logger="amdim"):
        folder = PairedFolder(tmp_path)
    assert folder.classes == ["cat", "dog"] and len(folder) == 5
    assert "notes.png" in caplog.text and "class folder" in caplog.text


def test_bad_view_files_are_skipped_at_build_time(tmp_path, caplog, monkeypatch):
    root = paired_folder(tmp_path)
    _image(root / "rgb" / "dog" / "1.png", np.zeros((64, 64, 3), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 is then a decompression bomb
    for view in ("rgb", "depth"):  # macOS metadata files beside every image: not images
        (root / view / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    with caplog.at_level(logging.WARNING, logger="amdim"):
        folder = PairedFolder(root)
    assert folder.skipped == [str(root / "rgb" / "dog" / "1.png")]
    assert "skipping unreadable image" in caplog.text and "rgb/dog/1.png" in caplog.text
    assert len(folder) == 4 and all("._" not in path for path in folder.paths)
    assert [folder[i][1] for i in range(4)] == [0, 0, 0, 1]
    with pytest.raises(DataError, match=r"rgb/dog/1.png.*--strict-data"):
        PairedFolder(root, strict=True)


class Items(torch.utils.data.Dataset):
    """A Dataset of your own whose items come from `item(i)`."""

    def __init__(self, item, n=4, classes=None):
        self.item, self.n = item, n
        if classes is not None:
            self.classes = classes

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.item(i)


def test_your_own_views_are_checked_item_by_item(tmp_path, caplog):
    cfg = paired_config("mine")
    hwc = np.zeros((16, 16, 3), np.uint8)
    chw = np.zeros((3, 16, 16), np.uint8)
    with pytest.raises(DataError, match=r"Items\[0\], view 1,.*\(3, 16, 16\).*\(C, H, W\)"):
        view_sources(cfg, Items(lambda i: ((hwc, chw), 0)))
    with pytest.raises(DataError, match=r"not \(views, label\).*\(views, -1\)"):
        view_sources(cfg, Items(lambda i: (hwc, hwc)))  # a Dataset without labels
    with pytest.raises(DataError, match="float32.*uint8"):
        view_sources(cfg, Items(lambda i: ((hwc, hwc.astype(np.float32)), 0)))
    with pytest.raises(DataError, match=r"Items.*outside -1..1.*label 2"):
        view_sources(cfg, Items(lambda i: ((hwc, hwc), i % 3), classes=["a", "b"]))

    def flaky(i):
        if i == 2:
            raise OSError("disk read error")
        return (hwc, hwc[..., :1]), i % 2

    with caplog.at_level(logging.WARNING, logger="amdim"):
        train, test, n_classes = view_sources(cfg, (Items(flaky), Items(flaky)))
    assert len(train) == 3 and train.skipped == ["Items[2]"] and n_classes == 2
    assert "Items[2]" in caplog.text and "disk read error" in caplog.text
    assert ViewSet(train, 32, "paired", train=True).skipped == ["Items[2]"]
    with pytest.raises(DataError, match=r"Items\[2\].*--strict-data"):
        view_sources(paired_config("mine", strict_data=True), Items(flaky))


def test_unlabelled_training_views_say_the_probes_are_off(tmp_path, caplog):
    views = {"view_a": np.zeros((4, 8, 8), np.uint8), "view_b": np.zeros((4, 8, 8), np.uint8)}
    np.savez(tmp_path / "u_train.npz", **views)
    np.savez(tmp_path / "u_test.npz", **views)
    with caplog.at_level(logging.WARNING, logger="amdim"):
        assert view_sources(paired_config(tmp_path / "u_train.npz"))[2] == 0
    assert "probes are off" in caplog.text
