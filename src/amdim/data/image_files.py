"""Image files on disk: which files count as images, decoding any PIL mode to 8-bit RGB, a
cheap check that a file decodes at all, and the folder datasets built on them (ImageFiles,
ImageClasses), which check every file when they are built, so that a bad file is found before
training rather than in a DataLoader worker hours later."""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset, Subset
from tqdm import tqdm

log = logging.getLogger("amdim")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# modes whose pixels hold more than 8 bits, with the value that maps to white
DEEP_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535,
              "I": 65535,  # Pillow opens 16-bit PGM (and some TIFF) as 32-bit "I"
              "F": 1.0}  # float TIFFs: taken as [0, 1]
GREY_MODES = ("1", "L", "LA", "La", *DEEP_MODES)  # PIL modes of greyscale images
WHITE = (255, 255, 255)
WARN_FILES = 10  # unreadable files named one by one at build time; the rest in one line
MAX_SUBSTITUTES = 10  # unreadable files in a row before a run stops: the folder itself is gone


class DataError(RuntimeError):
    """Data that is missing or unusable, with what to do about it."""


def image_files(folder: Path) -> list[Path]:
    """Every image file below `folder` (by extension, following links), sorted; names that start
    with "." (.ipynb_checkpoints, macOS ._ files) are left out."""
    found = []
    for parent, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(parent, n) for n in names
                  if not n.startswith(".") and Path(n).suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(found)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: 16-bit and float pixels are scaled (PIL's convert would clip
    them to white), transparent pixels are laid on white (dropping alpha would show whatever
    colour the transparent pixels happen to hold)."""
    if image.mode in DEEP_MODES:
        pixels = np.asarray(image, dtype=np.float64)
        if pixels.ndim == 3:  # Pillow may give (H, W, 1)
            pixels = pixels[..., 0]
        pixels = np.clip(pixels / DEEP_MODES[image.mode], 0, 1) * 255
        return Image.fromarray(np.round(pixels).astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """The image in `path` decoded to 8-bit RGB; raises whatever PIL raises on a bad file."""
    with Image.open(path) as image:
        return to_rgb(image)


# the bytes a complete file of these formats ends with (trailing padding aside)
END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}


def _ends_complete(path: str | os.PathLike, image_format: str | None) -> bool:
    marker = END_MARKERS.get(image_format)
    if marker is None:
        return False
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 1024))
        return f.read().rstrip(b"\x00\r\n \t").endswith(marker)


def problem(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be used as an image, or None if it can. A JPEG or PNG whose header
    parses and whose file ends with its format's end marker passes without decoding (a
    truncated file lacks the marker); anything else is decoded whole, JPEGs at 1/8 scale (the
    entropy-coded data is still read to the end, so truncation shows). Damage in the middle of
    a complete file is caught later, when the image is read (see _CheckedFiles)."""
    try:
        with Image.open(path) as image:
            if _ends_complete(path, image.format):
                return None
            image.draft(None, (1, 1))
            to_rgb(image)
    # any exception: Pillow's plugins raise OSError, SyntaxError, ValueError, struct.error, ...
    except Exception as error:  # noqa: BLE001
        return f"{type(error).__name__}: {error}"
    return None


def find_problems(paths: list[str], workers: int | None = None) -> dict[str, str]:
    """{path: reason} for every path in `paths` that does not decode (see `problem`), checked on
    threads (Pillow releases the GIL while decoding)."""
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        reasons = list(tqdm(pool.map(problem, paths), total=len(paths),
                            desc="checking images", unit="img", mininterval=2.0,
                            disable=len(paths) < 20_000))
    return {path: reason for path, reason in zip(paths, reasons) if reason is not None}


def files_of(sample_path: str | tuple[str, ...]) -> tuple[str, ...]:
    """The files of a sample: one image, or one per view of a context."""
    return (sample_path,) if isinstance(sample_path, str) else tuple(sample_path)


def check_labels(labels, n_classes: int | None, where: str) -> np.ndarray:
    """`labels` as int64 (N,), refused with a DataError unless each is -1 (unlabelled) or a class
    index below n_classes (None: any index). One rule for every source, so that a label no
    class has is named at build time instead of scoring 0% or failing in the probe."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.size == 0):
        raise DataError(f"{where}: labels must be integers (N,), got {labels.dtype} "
                        f"{labels.shape}; give class indices, -1 for an unlabelled image")
    labels = labels.astype(np.int64)
    top = np.iinfo(np.int64).max if n_classes is None else n_classes
    bad = (labels < -1) | (labels >= top)
    if bad.any():
        i = int(np.argmax(bad))
        allowed = f"-1..{top - 1} (the {n_classes} classes)" if n_classes is not None else ">= -1"
        raise DataError(f"{where}: {int(bad.sum())} label(s) lie outside {allowed}, e.g. item "
                        f"{i} has label {labels[i]}; fix the labels (-1: unlabelled)")
    return labels


def drop_unreadable(samples: list, problems: dict[str, str], strict: bool, root) -> list:
    """`samples` ((path or paths, label)) without those that hold a file of `problems`
    ({file: why}): each bad file named in a warning (up to WARN_FILES), or, strict, a DataError.
    The rule of every data source: a bad file is found and named when the set is built."""
    if problems and strict:
        named = "; ".join(f"{path} ({why})" for path, why in list(problems.items())[:5])
        more = f" and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise DataError(f"{len(problems)} unreadable image file(s) below {root}: {named}"
                        f"{more}. Remove or replace them, or run without --strict-data to "
                        "skip them with a warning")
    for path, why in list(problems.items())[:WARN_FILES]:
        log.warning("skipping unreadable image %s (%s)", path, why)
    if len(problems) > WARN_FILES:
        log.warning("skipping %d more unreadable images below %s (all are listed in the "
                    "dataset's `skipped`)", len(problems) - WARN_FILES, root)
    kept = [(path, label) for path, label in samples
            if not any(f in problems for f in files_of(path))]
    if not kept:
        path, why = next(iter(problems.items()))
        raise DataError(f"none of the {len(problems)} image files below {root} can be read "
                        f"(the first: {path}: {why}); check that they are images")
    return kept


class _CheckedFiles(Dataset):
    """(path, label) samples whose files were all decoded once when the set was built; the
    unreadable ones are in `skipped` (or, strict, stop with a DataError). A file that fails later
    is replaced by the next one, warned once per file and process (DataLoader workers are
    processes: such late failures do not reach `skipped` in the main process). A sample's path
    may be a tuple of files (the views of a context: data.paired.PairedFolder), read by `_load`;
    a context is left out when any of its files is bad."""

    def __init__(self, samples: list[tuple[str | tuple[str, ...], int]],
                 transform: Callable | None, strict: bool, root: Path):
        problems = find_problems([f for path, _ in samples for f in files_of(path)])
        self.samples = drop_unreadable(samples, problems, strict, root)
        self.skipped: list[str] = sorted(problems)
        self.root, self.transform, self.strict = root, transform, strict
        self._warned: set[str] = set()

    def _load(self, path: str | tuple[str, ...]):
        return open_rgb(path)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        for offset in range(len(self.samples)):
            path, label = self.samples[(index + offset) % len(self.samples)]
            try:
                image = self._load(path)
            # any exception: Pillow's plugins raise OSError, SyntaxError, ValueError, ...
            except Exception as error:  # noqa: BLE001
                self._unreadable(path, error)
                # a run of missing files is files deleted (go on) or the folder gone (stop)
                if offset + 1 >= MAX_SUBSTITUTES and not (
                        isinstance(error, FileNotFoundError) and self.root.is_dir()):
                    break
                continue
            return (self.transform(image) if self.transform else image), label
        last = " + ".join(files_of(path))
        raise DataError(f"{offset + 1} image files in a row from item {index} on are "
                        f"unreadable (the last: {last}); has the data folder {self.root} gone "
                        "away?")

    def _unreadable(self, path: str | tuple[str, ...], error: Exception) -> None:
        path = " + ".join(files_of(path))
        if self.strict:
            raise DataError(f"{path} became unreadable during the run ({type(error).__name__}: "
                            f"{error}); replace it, or run without --strict-data to skip it")
        if path not in self._warned:
            self._warned.add(path)
            self.skipped.append(path)
            log.warning("%s became unreadable (%s: %s); using the next image in its place",
                        path, type(error).__name__, error)


class ImageFiles(_CheckedFiles):
    """Every image file below a folder, unlabelled (label -1): for pretraining only."""

    def __init__(self, root: Path, transform: Callable | None, strict: bool = False):
        root = Path(root)
        files = image_files(root)
        if not files:
            raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found below {root}; "
                            "put the images there (in any subfolders), or, for a labelled run, "
                            f"in {root}/train/<class>/ and {root}/val/<class>/")
        super().__init__([(str(f), -1) for f in files], transform, strict, root)

    @property
    def files(self) -> list[Path]:
        return [Path(path) for path, _ in self.samples]


class ImageClasses(_CheckedFiles):
    """root/<class>/.../<image> as (image, class index), like torchvision's ImageFolder (same
    `classes`, `class_to_idx`, `samples`, `targets`), but with unreadable files skipped."""

    def __init__(self, root: Path, transform: Callable | None, strict: bool = False):
        root = Path(root)
        self.classes = sorted(p.name for p in root.iterdir()
                              if p.is_dir() and not p.name.startswith("."))
        loose = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        if not self.classes:
            held = f"holds {len(loose)} images but no" if loose else "holds no"
            raise DataError(f"{root} {held} class subfolders; labels come from one subfolder of "
                            f"images per class ({root}/<class>/<image>). Sort the images into "
                            "class folders (pretraining without labels takes a plain folder of "
                            "images: one without train/)")
        if loose:
            log.warning("ignoring %d images directly in %s (such as %s): only those in a class "
                        "folder have a label", len(loose), root, loose[0].name)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        files = {name: image_files(root / name) for name in self.classes}
        empty = [name for name, found in files.items() if not found]
        if empty:
            raise DataError(f"the class folders {empty} in {root} hold no image files "
                            f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folders")
        samples = [(str(f), self.class_to_idx[name])
                   for name, found in files.items() for f in found]
        super().__init__(samples, transform, strict, root)
        kept = {label for _, label in self.samples}
        lost = [name for name, i in self.class_to_idx.items() if i not in kept]
        if lost:  # (with strict, the first unreadable file has already stopped the run)
            log.warning("no readable image is left in the class folder(s) %s of %s: those "
                        "classes have no images here", lost, root)

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]


def skipped_files(dataset: Dataset) -> list[str]:
    """The image files left out of `dataset` because they could not be read (looking inside
    Subset and ConcatDataset); [] for datasets that do not read files."""
    if isinstance(dataset, Subset):
        return skipped_files(dataset.dataset)
    if isinstance(dataset, ConcatDataset):
        return [path for part in dataset.datasets for path in skipped_files(part)]
    return list(getattr(dataset, "skipped", []))
