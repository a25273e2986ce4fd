"""A memory-mapped image store: every image of a folder as one JPEG stream in a single file,
written once by `amdim prepare` (data.prepare) and read in place, so that a store of tens of
GB needs no RAM copy (the page cache holds what is read) and no per-file opens.

A store is a folder:

    store.json   format, version, short_side, quality, source (the folder it was made from),
                 dataset (its name, for the normalisation statistics), images (N), views
                 (paired: the K view names, else null), channels (paired: per view), classes,
                 skipped ({file relative to source: why}), complete (true once written whole)
    jpeg.u8      the JPEG streams end to end (np.memmap, mode "r")
    offsets.npy  int64 (N*K + 1,): view k of item i is jpeg[offsets[i*K + k]:offsets[i*K + k + 1]]
                 (K = 1 for single images)
    labels.npy   int64 (N,), -1 where unlabelled
    sizes.npy    int32 (N, 2) (height, width) as stored; paired (N, K, 2)
    files.txt    each item's file relative to source (paired: relative to every view folder)

A folder with train/ and val/ (or test/) gives one store per split, OUT/train and OUT/val.
"""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .image_files import MAX_SUBSTITUTES, DataError, check_labels, to_rgb

log = logging.getLogger("amdim")
FORMAT, VERSION = "amdim-image-store", 1
INFO = "store.json"
ARRAYS = ("jpeg.u8", "offsets.npy", "labels.npy", "sizes.npy", "files.txt")


def is_store(path) -> bool:
    """Whether `path` is a store folder (it holds a store.json; complete or not)."""
    return (Path(path) / INFO).is_file()


def _damaged(path: Path, why: str, source: str | None = None) -> DataError:
    again = f"amdim prepare {source} {path}" if source else "amdim prepare SRC " + str(path)
    return DataError(f"the image store {path} is damaged or incomplete ({why}); rerun "
                     f"`{again}` to finish or rebuild it")


def store_info(path) -> dict:
    """The store.json of the complete store at `path`, or a DataError saying to rerun prepare."""
    path = Path(path)
    try:
        info = json.loads((path / INFO).read_text())
    except (OSError, ValueError) as error:
        raise _damaged(path, f"cannot read {INFO}: {error}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise _damaged(path, f"{INFO} does not describe an {FORMAT}")
    if info.get("version") != VERSION:
        raise _damaged(path, f"format version {info.get('version')}, this code reads {VERSION}",
                       info.get("source"))
    if info.get("complete") is not True:
        raise _damaged(path, "prepare did not finish", info.get("source"))
    missing = [name for name in ARRAYS if not (path / name).is_file()]
    if missing:
        raise _damaged(path, f"{', '.join(missing)} missing", info.get("source"))
    return info


class ImageStore(Dataset):
    """A store written by `amdim prepare`, items as an image folder's: (transform(PIL RGB
    image) or the image, label), like image_files.ImageClasses; paired stores give (tuple of
    uint8 (H, W, C) views, label), like paired.PairedFolder (`names`, `channels`). An entry
    that fails to decode is replaced by the next one, warned once and added to `skipped`
    (strict: a DataError), as image_files._CheckedFiles does for files.

    labels int64 (N,); classes (labelled stores only); sizes (N, 2) or (N, K, 2) (height,
    width); skipped (the source files left out); jpeg_bytes and offsets (memory maps of
    jpeg.u8 and offsets.npy) and jpeg(i) for a decoder that takes JPEG streams itself."""

    def __init__(self, path, transform: Callable | None = None, strict: bool = False):
        self.path, self.transform, self.strict = Path(path), transform, strict
        info = store_info(self.path)
        self.source, self.dataset = info["source"], info.get("dataset")
        n, views = int(info["images"]), info.get("views")
        self.paired = bool(views)
        self.n_views = len(views) if views else 1  # K: JPEG streams per item
        if self.paired:
            self.names, self.channels = tuple(views), tuple(info["channels"])
        try:
            self.labels = np.load(self.path / "labels.npy", allow_pickle=False).astype(np.int64)
            self.sizes = np.load(self.path / "sizes.npy", allow_pickle=False)
            self._open()
        except (OSError, ValueError) as error:  # numpy's header errors, an empty jpeg.u8
            raise _damaged(self.path, f"{type(error).__name__}: {error}", self.source) from None
        shape = (n, self.n_views, 2) if views else (n, 2)
        if n < 1 or self.labels.shape != (n,) or self.sizes.shape != shape:
            raise _damaged(self.path, f"labels {self.labels.shape} and sizes "
                           f"{self.sizes.shape} for {n} images", self.source)
        offsets = np.asarray(self.offsets)
        if (len(offsets) != n * self.n_views + 1 or offsets[0] != 0
                or offsets[-1] != len(self.jpeg_bytes) or (np.diff(offsets) <= 0).any()):
            raise _damaged(self.path, f"the {len(offsets)} offsets do not cut the "
                           f"{len(self.jpeg_bytes)} bytes of jpeg.u8 into {n * self.n_views} "
                           "streams", self.source)
        classes = [str(c) for c in info.get("classes") or []]
        check_labels(self.labels, len(classes) or None, str(self.path))
        if classes:  # like ImageFiles, an unlabelled store has no `classes`
            self.classes = classes
        self.skipped = [str(Path(self.source, name)) for name in info.get("skipped", {})]
        self._files: list[str] | None = None
        self._warned: set[int] = set()

    def _open(self) -> None:
        self.jpeg_bytes = np.memmap(self.path / "jpeg.u8", dtype=np.uint8, mode="r")
        self.offsets = np.load(self.path / "offsets.npy", mmap_mode="r", allow_pickle=False)

    def __getstate__(self) -> dict:
        # DataLoader workers under spawn get the dataset pickled: a memmap would pickle all of
        # its bytes, so the workers map the files again instead
        state = dict(self.__dict__)
        del state["jpeg_bytes"], state["offsets"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return len(self.labels)

    def jpeg(self, index: int, view: int = 0) -> np.ndarray:
        """The JPEG bytes of item `index` (paired: of its view `view`), uint8, a view into the
        memory map (no copy)."""
        k = index * self.n_views + view
        return self.jpeg_bytes[self.offsets[k]:self.offsets[k + 1]]

    @property
    def files(self) -> list[Path]:
        """Each item's name as a path inside the store: the store folder / its file's path
        relative to the source (what the source folder would name it, below the store)."""
        return [self.path / name for name in self._names()]

    def _names(self) -> list[str]:
        if self._files is None:  # read when needed: a million names are 100 MB of str
            self._files = (self.path / "files.txt").read_text().splitlines()
        return self._files

    def name(self, index: int) -> str:
        """The source file(s) of item `index`, to name it in a message."""
        relative = self._names()[index]
        if not self.paired:
            return str(Path(self.source, relative))
        return " + ".join(str(Path(self.source, view, relative)) for view in self.names)

    def _load(self, index: int):
        if not self.paired:
            with Image.open(io.BytesIO(self.jpeg(index))) as image:
                return to_rgb(image)
        views = []
        for k, channels in enumerate(self.channels):
            with Image.open(io.BytesIO(self.jpeg(index, k))) as image:
                rgb = to_rgb(image)  # as paired.view_pixels: greyscale through RGB
                views.append(np.asarray(rgb.convert("L"))[..., None] if channels == 1
                             else np.asarray(rgb))
        return tuple(views)

    def __getitem__(self, index: int):
        for offset in range(len(self)):
            i = (index + offset) % len(self)
            try:
                image = self._load(i)
            # any exception: Pillow's plugins raise OSError, SyntaxError, ValueError, ...
            except Exception as error:  # noqa: BLE001
                self._unreadable(i, error)
                if offset + 1 >= MAX_SUBSTITUTES:
                    break
                continue
            if self.transform is not None and not self.paired:  # views: paired's ViewSet
                image = self.transform(image)
            return image, int(self.labels[i])
        raise _damaged(self.path, f"{offset + 1} images in a row from item {index} on do not "
                       f"decode (the last: {self.name(i)})", self.source)

    def _unreadable(self, index: int, error: Exception) -> None:
        name = self.name(index)
        if self.strict:
            raise DataError(f"{name} in the store {self.path} does not decode "
                            f"({type(error).__name__}: {error}); rerun `amdim prepare` to "
                            "rebuild the store, or run without --strict-data to skip it")
        if index not in self._warned:
            self._warned.add(index)
            self.skipped.append(name)
            log.warning("%s in the store %s does not decode (%s: %s); using the next image in "
                        "its place", name, self.path, type(error).__name__, error)
