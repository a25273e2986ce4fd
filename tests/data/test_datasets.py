"""Bad input data: skipped with a warning (or a DataError under strict_data), folder layouts
that cannot work explained, odd image sizes and PIL modes served as (3, S, S) RGB tensors."""
import logging
import re

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, Subset
from torchvision import datasets

from amdim.config import preset
from amdim.data.datasets import ArrayImages, class_names, digits, labelled_split
from amdim.data.image_files import (DataError, ImageClasses, ImageFiles, open_rgb, skipped_files,
                                    to_rgb)
from amdim.training.inputs import build_datasets


def save_image(path, size=(40, 30), value=None):
    """A small RGB image file (random pixels unless `value`); the suffix picks the format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    pixels = (np.full((h, w, 3), value, np.uint8) if value is not None
              else np.random.default_rng(len(str(path))).integers(0, 256, (h, w, 3), np.uint8))
    Image.fromarray(pixels).save(path)
    return path


def labelled_folder(root, classes=("cat", "dog"), n=3, size=(40, 30), splits=("train", "val")):
    for split in splits:
        for name in classes:
            for i in range(n):
                save_image(root / split / name / f"{i}.png", size)
    return root


def truncated_jpeg(path):
    save_image(path.with_suffix(".tmp.jpg"), (64, 48))
    data = path.with_suffix(".tmp.jpg").read_bytes()
    path.with_suffix(".tmp.jpg").unlink()
    path.write_bytes(data[:len(data) // 2])
    return path


def config(folder, **overrides):
    return preset("digits", data=str(folder), **overrides)


def warnings_naming(caplog, path):
    return [r for r in caplog.records
            if r.levelno == logging.WARNING and str(path) in r.getMessage()]


# -- unreadable files


@pytest.mark.parametrize("layout", ["labelled", "unlabelled"])
def test_bad_files_are_skipped_with_one_warning_each(tmp_path, caplog, layout):
    folder = labelled_folder(tmp_path / "data")
    bad_dir = folder / "train" / "cat" if layout == "labelled" else folder / "loose"
    if layout == "unlabelled":
        for split in ("train", "val"):
            (folder / split).rename(folder / f"{split}-images")  # no train/: unlabelled
        save_image(bad_dir / "good.png")
    truncated = truncated_jpeg(bad_dir / "truncated.jpg")
    text = bad_dir / "notes.jpg"
    text.write_text("not an image")
    (bad_dir / "README.txt").write_text("not an image extension: ignored, not skipped")
    with caplog.at_level(logging.WARNING, logger="amdim"):
        train, _, _ = build_datasets(config(folder))
    assert sorted(train.skipped) == sorted([str(truncated), str(text)])
    assert skipped_files(train) == train.skipped
    assert len(warnings_naming(caplog, truncated)) == 1 and len(warnings_naming(caplog, text)) == 1
    assert len(train) == (6 if layout == "labelled" else 13)
    for (x1, x2), _ in DataLoader(train, batch_size=4):  # every item loads
        assert x1.shape[1:] == x2.shape[1:] == (3, 32, 32)


def test_strict_data_stops_naming_the_file(tmp_path):
    folder = labelled_folder(tmp_path / "data")
    bad = truncated_jpeg(folder / "val" / "dog" / "bad.jpg")
    with pytest.raises(DataError, match="bad.jpg") as error:
        build_datasets(config(folder, strict_data=True))
    assert "--strict-data" in str(error.value)
    with pytest.raises(DataError, match="bad.jpg"):
        build_datasets(config(folder / "val", strict_data=True))  # unlabelled: no train/
    assert len(build_datasets(config(folder))[1].skipped) == 1  # not strict: skipped
    assert bad.exists()


def test_file_that_breaks_later_is_replaced_by_the_next_and_warned_once(tmp_path, caplog):
    folder = labelled_folder(tmp_path / "data", n=2)
    train = ImageClasses(folder / "train", transform=None)
    path, _ = train.samples[1]
    expected = open_rgb(train.samples[2][0])
    with open(path, "w") as f:
        f.write("gone bad")
    with caplog.at_level(logging.WARNING, logger="amdim"):
        first, second = train[1], train[1]
    assert len(warnings_naming(caplog, path)) == 1
    for image, label in (first, second):  # deterministic: always the next item
        assert np.array_equal(np.asarray(image), np.asarray(expected)) and label == 1
    assert skipped_files(train) == [path]
    strict = ImageClasses(folder / "val", transform=None, strict=True)
    open(strict.samples[0][0], "wb").close()  # emptied: unreadable
    with pytest.raises(DataError, match=re.escape(strict.samples[0][0])):
        strict[0]


def test_worker_processes_survive_a_file_that_breaks_later(tmp_path):
    folder = labelled_folder(tmp_path / "data", n=4)
    train, _, _ = build_datasets(config(folder))
    open(train.samples[3][0], "wb").close()
    loader = DataLoader(train, batch_size=4, num_workers=2)
    assert sum(len(labels) for _, labels in loader) == len(train)


def test_a_folder_that_goes_away_stops_with_a_clear_error(tmp_path):
    folder = labelled_folder(tmp_path / "data", n=6)
    train = ImageFiles(folder, transform=None)
    for path, _ in train.samples:
        open(path, "wb").close()
    with pytest.raises(DataError, match="gone away"):
        train[0]


def test_skipped_files_looks_inside_wrappers(tmp_path):
    folder = tmp_path / "images"
    save_image(folder / "a.png")
    (folder / "b.png").write_bytes(b"\x89PNG broken")
    files = ImageFiles(folder, transform=None)
    assert skipped_files(Subset(files, [0])) == [str(folder / "b.png")]
    assert len(skipped_files(ConcatDataset([files, files]))) == 2
    assert skipped_files(ArrayImages(*digits("test"), transform=None)) == []


# -- folder layouts that cannot work


def test_missing_path_and_file_path(tmp_path):
    with pytest.raises(DataError, match="does not exist") as error:
        build_datasets(config(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in str(error.value)
    (tmp_path / "data.txt").write_bytes(b"")
    with pytest.raises(DataError, match="is a file, not a folder"):
        build_datasets(config(tmp_path / "data.txt"))
    (tmp_path / "data.npz").write_bytes(b"")  # an empty (truncated) archive
    with pytest.raises(DataError, match="not a readable .npz archive"):
        build_datasets(config(tmp_path / "data.npz"))
    with pytest.raises(DataError, match="does not exist"):
        labelled_split(str(tmp_path / "nowhere"), "train", transform=None)


def test_empty_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files .* found below .*empty"):
        build_datasets(config(tmp_path / "empty"))
    (tmp_path / "labelled" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="train holds no class subfolders"):
        build_datasets(config(tmp_path / "labelled"))
    (tmp_path / "labelled" / "train" / "cat").mkdir()
    with pytest.raises(DataError, match=r"class folders \['cat'\] .* hold no image files"):
        build_datasets(config(tmp_path / "labelled"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.jpg").write_text("text")
    with pytest.raises(DataError, match="none of the 1 image files"):
        build_datasets(config(tmp_path / "broken"))


def test_labelled_run_needs_class_folders(tmp_path):
    for i in range(3):
        save_image(tmp_path / "train" / f"{i}.png")
    with pytest.raises(DataError, match="train holds 3 images but no class subfolders") as error:
        build_datasets(config(tmp_path))
    assert "<class>" in str(error.value)


def test_loose_images_beside_class_folders_are_ignored_with_a_warning(tmp_path, caplog):
    folder = labelled_folder(tmp_path / "data", splits=("train",))
    save_image(folder / "train" / "stray.png")
    with caplog.at_level(logging.WARNING, logger="amdim"):
        train, test, n_classes = build_datasets(config(folder))
    assert len(train) == 6 and test is None and n_classes == 2
    assert any("stray.png" in r.getMessage() for r in caplog.records)


def test_train_and_val_must_hold_the_same_classes(tmp_path):
    folder = labelled_folder(tmp_path / "data")
    save_image(folder / "val" / "bird" / "0.png")
    with pytest.raises(DataError, match=r"only in train/: \[\], only in val/: \['bird'\]"):
        build_datasets(config(folder))


def test_image_classes_match_torchvision_image_folder(tmp_path):
    folder = labelled_folder(tmp_path / "data", classes=("b", "a", "c"), n=2)
    (folder / "train" / ".ipynb_checkpoints").mkdir()  # hidden: not a class
    ours = labelled_split(str(folder), "train", transform=None)
    (folder / "train" / ".ipynb_checkpoints").rmdir()
    theirs = datasets.ImageFolder(str(folder / "train"))
    assert ours.classes == theirs.classes and ours.class_to_idx == theirs.class_to_idx
    assert ours.samples == theirs.samples and ours.targets == theirs.targets
    assert class_names(ours) == ["a", "b", "c"]


# -- sizes and modes


@pytest.mark.parametrize("image_size", [32, 64, 128])
def test_any_image_size_gives_tensors_of_the_encoder_size(tmp_path, image_size):
    sizes = [(50, 70), (20, 20), (33, 31), (7, 300), (300, 7), (1, 1)]
    for split in ("train", "val"):
        for i, size in enumerate(sizes):
            save_image(tmp_path / split / "any" / f"{i}.png", size)
    train, test, _ = build_datasets(config(tmp_path, image_size=image_size))
    shape = (3, image_size, image_size)
    for i in range(len(sizes)):
        (x1, x2), label = train[i]
        assert x1.shape == x2.shape == test[i][0].shape == shape and label == 0


def write_modes(folder):
    """One image per PIL mode, with known pixels; returns {file name: expected RGB of (0, 0)}."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("L", (9, 7), 100).save(folder / "gray.png")
    palette = Image.new("P", (9, 7), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.save(folder / "palette.png")
    Image.new("RGBA", (9, 7), (255, 0, 0, 255)).save(folder / "rgba.png")
    Image.new("CMYK", (9, 7), (0, 255, 255, 0)).save(folder / "cmyk.tif")
    Image.new("CMYK", (9, 7), (0, 0, 0, 0)).save(folder / "cmyk.jpg", quality=100)
    deep = np.full((7, 9), 32896, np.uint16)  # 32896 / 257 = 128 exactly
    Image.fromarray(deep).save(folder / "deep.png")  # I;16
    # a 16-bit PGM (Pillow reads it as "I"), written from mode I: Pillow < 11 writes no I;16 PGM
    Image.fromarray(deep.astype(np.int32), "I").save(folder / "deep.pgm")
    return {"gray.png": (100,) * 3, "palette.png": (10, 200, 30), "rgba.png": (255, 0, 0),
            "cmyk.tif": (255, 0, 0), "cmyk.jpg": (255, 255, 255), "deep.png": (128,) * 3,
            "deep.pgm": (128,) * 3}


def test_every_mode_is_read_as_rgb(tmp_path):
    expected = write_modes(tmp_path / "modes")
    assert Image.open(tmp_path / "modes" / "deep.png").mode == "I;16"
    for name, rgb in expected.items():
        image = open_rgb(tmp_path / "modes" / name)
        assert image.mode == "RGB" and image.size == (9, 7)
        assert np.abs(np.asarray(image)[0, 0].astype(int) - rgb).max() <= 1, name
    train, _, _ = build_datasets(config(tmp_path / "modes"))
    assert train.skipped == [] and len(train) == len(expected)
    for i in range(len(train)):
        (x1, x2), _ = train[i]
        assert x1.shape == x2.shape == (3, 32, 32)


def test_sixteen_bit_is_scaled_not_clipped():
    ramp = np.array([[0, 257, 1000, 32896, 65535]], np.uint16)  # (1, 5)
    for image in (Image.fromarray(ramp), Image.fromarray(ramp.astype(np.int32), "I")):
        assert np.asarray(to_rgb(image))[0, :, 0].tolist() == [0, 1, 4, 128, 255]
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0, 2.0]], np.float32), "F")
    assert np.asarray(to_rgb(floats))[0, :, 0].tolist() == [0, 128, 255, 255]


def test_transparent_pixels_are_laid_on_white():
    rgba = np.zeros((2, 2, 4), np.uint8)  # transparent black ...
    rgba[0, 0] = (0, 0, 255, 255)  # ... and one opaque blue pixel
    rgb = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA")))
    assert rgb[0, 0].tolist() == [0, 0, 255] and rgb[1, 1].tolist() == [255, 255, 255]


def test_npz_splits_as_in_shared_data(tmp_path):
    """--data NAME_train.npz (JPEG streams laid end to end) finds NAME_test.npz beside it."""
    import io

    import numpy as np

    from amdim.config import preset
    from amdim.data.datasets import labelled_split, normalisation
    from amdim.training.inputs import build_datasets

    def write(path, n):
        streams, labels = [], []
        for i in range(n):
            buffer = io.BytesIO()
            Image.new("RGB", (32, 32), (8 * i, 100, 200)).save(buffer, "JPEG")
            streams.append(np.frombuffer(buffer.getvalue(), np.uint8))
            labels.append(i % 3)
        offsets = np.cumsum([0] + [len(s) for s in streams])
        np.savez(path, jpeg=np.concatenate(streams), offsets=offsets,
                 labels=np.array(labels, np.int16), classes=np.array(["a", "b", "c"]))

    write(tmp_path / "cifar10_jpeg_train.npz", 12)
    write(tmp_path / "cifar10_jpeg_test.npz", 6)
    data = str(tmp_path / "cifar10_jpeg_train.npz")
    train, test, n_classes = build_datasets(preset("digits", data=data))
    assert (len(train), len(test), n_classes) == (12, 6, 3)
    (x1, x2), label = train[4]
    assert x1.shape == (3, 32, 32) and label == 1
    assert normalisation(data) == normalisation("cifar10")
    assert len(labelled_split(data, "test", lambda image: image)) == 6


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "stl10"])
def test_missing_torchvision_dataset_names_the_path(tmp_path, name):
    with pytest.raises(DataError, match=f"{name} not found under {tmp_path}.*--download"):
        build_datasets(preset("cifar-small", data=name, data_root=str(tmp_path)))
    with pytest.raises(DataError, match=f"{name} not found under {tmp_path}"):
        labelled_split(name, "train", transform=None, data_root=str(tmp_path))


# -- issue 17: damaged datasets end in a message and lose nothing readable


def write_npz(path, n=12, labels=None, classes=("a", "b", "c"), size=32, damage=()):
    """A NAME_train.npz of n JPEG streams laid end to end; the streams in `damage` are
    garbled (a header that parses, then noise)."""
    import io

    streams = []
    for i in range(n):
        buffer = io.BytesIO()
        Image.new("RGB", (size, size), (8 * i, 100, 200)).save(buffer, "JPEG")
        data = buffer.getvalue()
        if i in damage:
            data = data[:20] + b"\x00" * 40
        streams.append(np.frombuffer(data, np.uint8))
    offsets = np.cumsum([0] + [len(s) for s in streams])
    labels = np.arange(n) % len(classes) if labels is None else np.asarray(labels)
    np.savez(path, jpeg=np.concatenate(streams), offsets=offsets, labels=labels,
             classes=np.array(classes))
    return path


def test_undecodable_npz_entries_are_skipped_and_counted(tmp_path, caplog):
    path = write_npz(tmp_path / "set_train.npz", damage=(0, 5))
    with caplog.at_level(logging.WARNING, logger="amdim"):
        train, _, n_classes = build_datasets(preset("digits", data=str(path)))
    assert len(train) == 10 and n_classes == 3
    assert skipped_files(train) == [f"{path}[0]", f"{path}[5]"]
    assert "skipping undecodable image 5" in caplog.text
    with pytest.raises(DataError, match="2 undecodable image.*--strict-data"):
        build_datasets(preset("digits", data=str(path), strict_data=True))


@pytest.mark.parametrize("damage, message", [
    ("truncated", "not a readable .npz archive: damaged"),
    ("flipped", "not a readable .npz archive: damaged"),
    ("text", "not a readable .npz archive .it starts with b'just'"),
    ("offsets", "offsets are not increasing"),
    ("labels", "labels lie outside -1..2"),
])
def test_damaged_npz_files_are_explained(tmp_path, damage, message):
    path = tmp_path / "set_train.npz"
    if damage == "text":
        path.write_text("just some text\n")
    elif damage == "labels":
        write_npz(path, labels=[0, 1, 2, 7] * 3)
    elif damage == "offsets":
        streams = np.frombuffer(b"\xff" * 100, np.uint8)
        np.savez(path, jpeg=streams, offsets=np.array([0, 60, 40, 100]),
                 labels=np.zeros(3, np.int64))
    else:
        np.savez_compressed(path, jpeg=np.arange(50_000, dtype=np.uint8) % 7,
                            offsets=np.array([0, 50_000]), labels=np.zeros(1, np.int64))
        data = bytearray(path.read_bytes())
        if damage == "truncated":
            data = data[:len(data) // 2]
        else:  # a byte inside the compressed jpeg array
            data[len(data) // 3] ^= 0xFF
        path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=message):
        build_datasets(preset("digits", data=str(path)))


def test_a_class_with_no_readable_file_is_named(tmp_path, caplog):
    folder = labelled_folder(tmp_path / "data", classes=("cat", "dog"), n=2)
    for path in (folder / "train" / "dog").iterdir():
        path.write_text("not an image")
    with caplog.at_level(logging.WARNING, logger="amdim"):
        train = ImageClasses(folder / "train", transform=None)
    assert "no readable image is left in the class folder(s) ['dog']" in caplog.text
    assert len(train) == 2
    with pytest.raises(DataError, match="unreadable image file"):
        ImageClasses(folder / "train", transform=None, strict=True)


def test_files_deleted_mid_run_are_skipped_warned_and_counted(tmp_path, caplog):
    folder = labelled_folder(tmp_path / "data", classes=("cat", "dog"), n=12)
    train = ImageClasses(folder / "train", transform=None)
    deleted = [path for path, label in train.samples if label == 0]  # a whole class: 12 in a row
    for path in deleted:
        (folder / "train" / "cat" / path.rsplit("/", 1)[1]).unlink()
    with caplog.at_level(logging.WARNING, logger="amdim"):
        items = [train[i] for i in range(len(train))]
    assert all(label == 1 for _, label in items)  # each replaced by a readable image
    assert sorted(skipped_files(train)) == sorted(deleted)
    assert len(warnings_naming(caplog, deleted[0])) == 1
    import shutil
    shutil.rmtree(folder / "train")
    with pytest.raises(DataError, match="gone away"):
        train[0]


def test_download_without_network_says_where_to_put_the_files(tmp_path, monkeypatch):
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(datasets, "CIFAR10", offline)
    with pytest.raises(DataError, match=f"no network here.*cifar-10-python.tar.gz.*{tmp_path}"):
        build_datasets(preset("cifar-cpu", data="cifar10", data_root=str(tmp_path),
                              download=True))


def test_stored_image_size_of_names_folders_and_npz(tmp_path):
    from amdim.data.datasets import stored_image_size

    assert stored_image_size("cifar10") == 32 and stored_image_size("stl10") == 96
    assert stored_image_size(str(labelled_folder(tmp_path / "f", size=(128, 96)))) == 128
    assert stored_image_size(str(write_npz(tmp_path / "s_train.npz", size=64))) == 64
    assert stored_image_size(str(tmp_path / "missing")) is None


def test_an_npz_test_set_with_labels_outside_the_classes_is_refused(tmp_path):
    # before: 0% accuracy, or an IndexError in the probe
    train = write_npz(tmp_path / "s_train.npz", n=6)  # classes a, b, c
    test = write_npz(tmp_path / "s_test.npz", n=6, labels=[0, 1, 2, 3, 4, 5])
    with np.load(test) as arrays:  # the test file names no classes: its labels say 6
        np.savez(test, **{k: arrays[k] for k in ("jpeg", "offsets", "labels")})
    for build in (lambda: build_datasets(config(train)),
                  lambda: labelled_split(str(train), "test", None)):
        with pytest.raises(DataError, match=r"s_test.npz.*outside -1..2.*label 3"):
            build()
    write_npz(test, n=6, classes=("a", "c", "b"))  # the same names in another order
    with pytest.raises(DataError, match="another order"):
        build_datasets(config(train))


def test_an_evaluation_test_split_lacking_a_class_is_refused(tmp_path):
    folder = labelled_folder(tmp_path / "data", classes=("bird", "cat"), splits=("train",))
    labelled_folder(folder, classes=("cat",), splits=("val",))  # "cat" would be label 0: bird
    with pytest.raises(DataError, match=r"only in train/: \['bird'\]"):
        labelled_split(str(folder), "test", None)
