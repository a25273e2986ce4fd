"""`amdim prepare` and the memory-mapped ImageStore: layouts, sizes, kept bytes, resuming,
refusals, bad files (skipped and named, or strict), damaged stores, and --data on a store."""
import io
import json
import logging
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from amdim.cli import main
from amdim.config import preset
from amdim.data import image_files, prepare as prepare_module
from amdim.data.datasets import (STATS, dataset_name, labelled_split, normalisation,
                                 pretraining_datasets, stored_image_size)
from amdim.data.image_files import DataError
from amdim.data.paired import view_source
from amdim.data.prepare import prepare
from amdim.data.store import ARRAYS, INFO, ImageStore


def save(path, shape, mode="RGB", fmt=None, seed=0):
    """A random image of `shape` (H, W) in `mode`, saved by its suffix (or `fmt`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = shape
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path, fmt, quality=90)
    return path


def truncated(path):
    data = save(path, (48, 64)).read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


def classes_folder(root, n=3):
    """root/cat and root/dog: small and large RGB JPEGs, a greyscale and a CMYK JPEG, a PNG."""
    for c, name in enumerate(("cat", "dog")):
        for i in range(n):
            save(root / name / f"{i}.jpg", (30 + 10 * i, 40), seed=10 * c + i)
        save(root / name / "big.jpg", (100, 80), seed=c)
        save(root / name / "grey.jpg", (30, 30), "L", seed=c)
        save(root / name / "cmyk.jpg", (30, 30), "CMYK", seed=c)
        save(root / name / "pic.png", (64, 200), seed=c)
    return root


def paired(root, n=3):
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            for i in range(n):
                save(root / split / "rgb" / name / f"{i}.png", (60, 50), seed=i)
                save(root / split / "depth" / name / f"{i}.png", (20, 20), "L", seed=i)
    return root


def image_size(image):
    return image.size


def read(store, i):
    return Image.open(io.BytesIO(store.jpeg(i).tobytes()))


def test_class_folders_round_trip(tmp_path):
    src = classes_folder(tmp_path / "src")
    truncated(src / "cat" / "broken.jpg")
    (src / "dog" / "notes.jpg").write_text("not an image")
    [out] = prepare(src, tmp_path / "out", short_side=32, workers=1)
    store = ImageStore(out)
    assert store.classes == ["cat", "dog"] and len(store) == 14
    names = [p.relative_to(out).as_posix() for p in store.files]
    assert names[:7] == ["cat/0.jpg", "cat/1.jpg", "cat/2.jpg", "cat/big.jpg", "cat/cmyk.jpg",
                         "cat/grey.jpg", "cat/pic.png"]
    assert store.labels.tolist() == [0] * 7 + [1] * 7
    sizes = dict(zip(names, store.sizes.tolist()))
    assert sizes["cat/0.jpg"] == [30, 40]  # short side 30 <= 32: not upscaled
    assert sizes["cat/1.jpg"] == [32, 32] and sizes["cat/2.jpg"] == [40, 32]
    assert sizes["cat/big.jpg"] == [40, 32]
    assert sizes["cat/pic.png"] == [32, 100]
    # small RGB and greyscale JPEGs keep their bytes; CMYK and PNG are re-encoded
    for name in ("cat/0.jpg", "cat/grey.jpg"):
        assert store.jpeg(names.index(name)).tobytes() == (src / name).read_bytes()
    assert read(store, names.index("cat/cmyk.jpg")).mode == "RGB"
    assert read(store, names.index("cat/pic.png")).format == "JPEG"
    for i, (h, w) in enumerate(store.sizes):
        assert read(store, i).size == (w, h)
    image, label = store[names.index("cat/grey.jpg")]
    assert image.mode == "RGB" and image.size == (30, 30) and label == 0
    info = json.loads((out / INFO).read_text())
    assert info["complete"] and info["images"] == 14 and info["views"] is None
    assert sorted(info["skipped"]) == ["cat/broken.jpg", "dog/notes.jpg"]
    assert sorted(store.skipped) == [str(src / "cat/broken.jpg"), str(src / "dog/notes.jpg")]
    assert not (out / "parts").exists()


def test_the_store_is_memory_mapped_and_pickles_without_its_bytes(tmp_path):
    [out] = prepare(classes_folder(tmp_path / "src"), tmp_path / "out", workers=1)
    store = ImageStore(out, transform=image_size)
    assert isinstance(store.jpeg_bytes, np.memmap) and store.jpeg_bytes.mode == "r"
    assert np.shares_memory(store.jpeg(3), store.jpeg_bytes)  # a view, no copy
    copy = pickle.loads(pickle.dumps(store))
    assert len(pickle.dumps(store)) < (out / "jpeg.u8").stat().st_size
    assert isinstance(copy.jpeg_bytes, np.memmap) and copy[3] == store[3]


def test_plain_folder_is_unlabelled_and_keeps_sizes_with_short_side_0(tmp_path):
    src = tmp_path / "photos"
    save(src / "a.jpg", (300, 200))
    save(src / "trip" / "b.png", (50, 70))
    [out] = prepare(src, tmp_path / "out", short_side=0, workers=1)
    store = ImageStore(out)
    assert store.labels.tolist() == [-1, -1] and not hasattr(store, "classes")
    assert store.sizes.tolist() == [[300, 200], [50, 70]]
    assert store.jpeg(0).tobytes() == (src / "a.jpg").read_bytes()
    train, test, n_classes = pretraining_datasets(preset("digits", data=str(out)), None, None)
    assert isinstance(train, ImageStore) and test is None and n_classes == 0
    with pytest.raises(DataError, match="no labels"):
        labelled_split(str(out), "train", None)


def test_train_val_layout_reads_like_its_source(tmp_path):
    src = tmp_path / "cifar10"
    classes_folder(src / "train")
    classes_folder(src / "val", n=1)
    out = tmp_path / "stores"
    assert prepare(src, out, short_side=32, workers=1) == [out / "train", out / "val"]
    test = labelled_split(str(out), "test", None)
    assert isinstance(test, ImageStore) and len(test) == 10 and test.classes == ["cat", "dog"]
    cfg = preset("digits", data=str(out))
    train, test, n_classes = pretraining_datasets(cfg, lambda x: "views", lambda x: "test")
    assert (len(train), len(test), n_classes) == (14, 10, 2)
    assert train[0] == ("views", 0) and test[9] == ("test", 1)
    assert dataset_name(str(out)) == "cifar10" and normalisation(str(out)) == STATS["cifar10"]
    assert stored_image_size(str(out)) == 40  # the first image: 30x40, stored as it is
    with pytest.raises(DataError, match="without a test split"):
        labelled_split(str(out / "train"), "test", None)


def test_paired_folder_store(tmp_path):
    src = paired(tmp_path / "src")
    out = tmp_path / "out"
    prepare(src, out, short_side=40, workers=1, paired=True)
    cfg = preset("digits", data=str(out), views="paired")
    train, test = view_source(cfg, "train"), view_source(cfg, "test")
    assert train.names == ("depth", "rgb") and train.channels == (1, 3)
    assert train.sizes.shape == (6, 2, 2) and train.sizes[0].tolist() == [[20, 20], [48, 40]]
    (depth, rgb), label = test[4]
    assert depth.shape == (20, 20, 1) and rgb.shape == (48, 40, 3) and label == 1
    assert depth.dtype == rgb.dtype == np.uint8 and test.classes == ["cat", "dog"]
    with pytest.raises(DataError, match="--views paired"):
        pretraining_datasets(preset("digits", data=str(out)), None, None)


def test_resume_after_an_interruption_equals_an_uninterrupted_prepare(tmp_path, monkeypatch):
    src = classes_folder(tmp_path / "src")
    prepare(src, tmp_path / "straight", short_side=32, workers=2, chunk_size=3)
    convert, done = prepare_module.convert, []

    def interrupted(chunk):  # Ctrl-C after two chunks
        if len(done) == 2:
            raise KeyboardInterrupt
        done.append(chunk.number)
        return convert(chunk)

    monkeypatch.setattr(prepare_module, "convert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(src, tmp_path / "resumed", short_side=32, workers=1, chunk_size=3)
    with pytest.raises(DataError, match="rerun `amdim prepare .*src"):
        ImageStore(tmp_path / "resumed")
    monkeypatch.setattr(prepare_module, "convert", lambda chunk: done.append(chunk.number)
                        or convert(chunk))
    prepare(src, tmp_path / "resumed", short_side=32, workers=1, chunk_size=3)
    assert done == [0, 1, 2, 3, 4]  # chunks 0 and 1 were not converted again
    for name in ARRAYS + (INFO,):
        assert (tmp_path / "resumed" / name).read_bytes() == \
            (tmp_path / "straight" / name).read_bytes(), name


def test_other_settings_and_out_inside_src_are_refused(tmp_path, monkeypatch):
    src = classes_folder(tmp_path / "src")
    monkeypatch.setattr(prepare_module, "convert", lambda chunk: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        prepare(src, tmp_path / "out", short_side=32, workers=1)
    with pytest.raises(ValueError, match="short_side 32 there, 48 now"):
        prepare(src, tmp_path / "out", short_side=48, workers=1)
    with pytest.raises(ValueError, match="inside SRC"):
        prepare(src, src / "store", workers=1)
    with pytest.raises(ValueError, match="inside SRC"):
        prepare(src, src, workers=1)
    (tmp_path / "full" / "x").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds other files"):
        prepare(src, tmp_path / "full", workers=1)


def test_strict_data_and_files_that_fail_only_when_decoded(tmp_path, monkeypatch, caplog):
    src = classes_folder(tmp_path / "src", n=1)
    truncated(src / "cat" / "broken.jpg")
    with pytest.raises(DataError, match="broken.jpg"):
        prepare(src, tmp_path / "strict", workers=1, strict=True)
    # a file the cheap check passes but that does not decode: left out, named, or strict
    monkeypatch.setattr(image_files, "problem", lambda path: None)
    with pytest.raises(DataError, match="broken.jpg"):
        prepare(src, tmp_path / "late-strict", workers=1, strict=True)
    with caplog.at_level(logging.WARNING, logger="amdim"):
        [out] = prepare(src, tmp_path / "late", workers=1)
    assert "broken.jpg" in caplog.text
    store = ImageStore(out)
    assert len(store) == 10 and store.skipped == [str(src / "cat" / "broken.jpg")]
    assert "OSError" in json.loads((out / INFO).read_text())["skipped"]["cat/broken.jpg"]


def test_damaged_stores_say_to_rerun_prepare(tmp_path):
    src = classes_folder(tmp_path / "src", n=1)
    [out] = prepare(src, tmp_path / "out", workers=1)
    offsets = np.load(out / "offsets.npy")
    np.save(out / "offsets.npy", offsets[:-1])
    with pytest.raises(DataError, match="offsets .* rerun `amdim prepare"):
        ImageStore(out)
    np.save(out / "offsets.npy", offsets)
    data = (out / "jpeg.u8").read_bytes()
    (out / "jpeg.u8").write_bytes(data[:-10])
    with pytest.raises(DataError, match="rerun"):
        ImageStore(out)
    (out / "jpeg.u8").unlink()
    with pytest.raises(DataError, match="jpeg.u8 missing"):
        ImageStore(out)


def test_an_entry_that_does_not_decode_is_replaced_and_named(tmp_path, caplog):
    [out] = prepare(classes_folder(tmp_path / "src", n=1), tmp_path / "out", workers=1)
    offsets = np.load(out / "offsets.npy")
    data = bytearray((out / "jpeg.u8").read_bytes())
    data[offsets[1]:offsets[2]] = bytes(offsets[2] - offsets[1])  # item 1: zeros
    (out / "jpeg.u8").write_bytes(bytes(data))
    store = ImageStore(out, transform=np.asarray)
    with caplog.at_level(logging.WARNING, logger="amdim"):
        image, label = store[1]
    assert np.array_equal(image, store[2][0]) and label == 0
    assert store.skipped == [str(tmp_path / "src" / "cat" / "big.jpg")]
    assert "big.jpg" in caplog.text
    with pytest.raises(DataError, match="big.jpg"):
        ImageStore(out, strict=True)[1]


def test_prepare_command_and_pretrain_on_its_store(tmp_path, capsys):
    src = tmp_path / "src"
    for split, n in (("train", 4), ("val", 2)):
        classes_folder(src / split, n=n)
    with pytest.raises(SystemExit, match="amdim prepare: OUT .* inside SRC"):
        main(["prepare", str(src), str(src / "out")])
    main(["prepare", str(src), str(tmp_path / "out"), "--short-side", "36", "--workers", "1",
          "--quality", "80"])
    assert json.loads((tmp_path / "out" / "val" / INFO).read_text())["quality"] == 80
    main(["pretrain", "--preset", "digits", "--data", str(tmp_path / "out"), "--ndf", "8",
          "--n-rkhs", "64", "--n-depth", "1", "--batch-size", "8", "--steps-per-epoch", "2",
          "--epochs", "1", "--workers", "0", "--no-final-probe", "--device", "cpu",
          "--run-dir", str(tmp_path / "run")])
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["epoch"] == 1 and "test_linear_acc" in lines[-1]
    run = tmp_path / "run" / "checkpoint.pt"
    main(["extract", str(run), "--workers", "0", "--out", str(tmp_path / "val.npz")])
    main(["extract", str(run), "--workers", "0", "--out", str(tmp_path / "train.npz"),
          "--data", str(tmp_path / "out" / "train")])  # one store: all of its images
    for name, n, first in (("val", 12, "val/cat/0.jpg"), ("train", 16, "cat/0.jpg")):
        with np.load(tmp_path / f"{name}.npz") as arrays:
            assert arrays["features"].shape == (n, 64) and arrays["names"][0] == first
            assert list(arrays["classes"]) == ["cat", "dog"]
    main(["evaluate", str(run), "--mode", "features", "--epochs", "1", "--workers", "0",
          "--out", str(tmp_path / "eval.json")])
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["n_train"] == 16 and report["n_test"] == 12


def test_a_store_of_one_image_size_takes_the_device_path(tmp_path, monkeypatch):
    from amdim.data.device_images import cache_dataset, stored_size
    from amdim.training.inputs import choose_data_path

    for i in range(4):
        save(tmp_path / "same" / "a" / f"{i}.jpg", (40, 40), seed=i)
    save(tmp_path / "mixed" / "a" / "0.jpg", (40, 40))
    save(tmp_path / "mixed" / "a" / "1.jpg", (40, 60))
    [same] = prepare(tmp_path / "same", tmp_path / "same-store", workers=1)
    [mixed] = prepare(tmp_path / "mixed", tmp_path / "mixed-store", workers=1)
    same_store, mixed_store = ImageStore(same), ImageStore(mixed)
    assert stored_size(same_store) == (40, 40) and stored_size(mixed_store) is None
    cfg = preset("digits", data=str(same))
    assert choose_data_path(cfg, same_store, torch.device("cpu")) == "device"  # decoded once
    assert choose_data_path(cfg, mixed_store, torch.device("cpu")) == "decode"
    cache = cache_dataset(same_store)
    assert cache.images.shape == (4, 3, 40, 40) and cache.labels.tolist() == [0] * 4
    import amdim.training.inputs as inputs  # too large to hold decoded: batch by batch

    monkeypatch.setattr(inputs, "fits_in_memory", lambda *args, **kwargs: False)
    assert choose_data_path(cfg, same_store, torch.device("cpu")) == "decode"
    save(tmp_path / "large" / "a" / "0.jpg", (100, 150))  # shorter sides > twice 32 px
    save(tmp_path / "large" / "a" / "1.jpg", (100, 120))
    [large] = prepare(tmp_path / "large", tmp_path / "large-store", workers=1)
    assert choose_data_path(cfg, ImageStore(large), torch.device("cpu")) == "loader"
