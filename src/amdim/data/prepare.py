"""`amdim prepare SRC OUT`: an image folder as a memory-mapped store (data.store), on every
core, resumable.

The folder is listed and checked as training lists it (image_files: ImageClasses for class
folders and for SRC/train and SRC/val, ImageFiles for a plain folder, paired.PairedFolder
with --paired), so the same files are skipped and named. The listing is saved first
(OUT/parts/plan.json); chunks of CHUNK items are then converted by a pool of processes, each
written as OUT/parts/NNNNNN.u8 and .json and renamed into place once whole, so that a rerun
after Ctrl-C or a kill converts only the missing chunks. The parts are joined last (streamed
from disk) and store.json marked complete; the parts are then removed (until then the store
takes twice its size on disk).

Images are stored as RGB JPEGs, greyscale ones (and the 1-channel views of paired folders)
as greyscale JPEGs: image_files.to_rgb reads both the same.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import multiprocessing
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..runtime import available_cores, check_output
from .datasets import _folder_split
from .image_files import (GREY_MODES, IMAGE_EXTENSIONS, WARN_FILES, DataError, ImageClasses,
                          ImageFiles, problem, to_rgb)
from .paired import PairedFolder
from .store import ARRAYS, FORMAT, INFO, VERSION, is_store

log = logging.getLogger("amdim")
DEFAULT_SHORT_SIDE = 256  # px: 2x the 128 px views, 0.2% of them upsampled (README); 0: as is
DEFAULT_QUALITY = 90  # JPEG quality of re-encoded images (4:2:0)
CHUNK = 1000  # images per part file: the unit of work and of resuming
PARTS = "parts"
SPLITS = ("train", "val", "test")


def target_size(size: tuple[int, int], short_side: int) -> tuple[int, int]:
    """(width, height) with the shorter side brought down to `short_side` (never up; 0: as is)."""
    width, height = size
    if not short_side or min(width, height) <= short_side:
        return size
    if width <= height:
        return short_side, max(1, round(height * short_side / width))
    return max(1, round(width * short_side / height)), short_side


def encode(path: str, channels: int | None, short_side: int, quality: int
           ) -> tuple[bytes, tuple[int, int]]:
    """(JPEG bytes, (height, width)) of the image file `path` as stored. channels: 1 (a
    greyscale view), 3 (an RGB view) or None (greyscale images as greyscale, others RGB). A
    JPEG already in that mode and size keeps its bytes (no second generation of loss)."""
    data = Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        grey = channels == 1 or (channels is None and image.mode in GREY_MODES)
        size = target_size(image.size, short_side)
        if image.format == "JPEG" and image.mode == ("L" if grey else "RGB") \
                and size == image.size:
            image.load()  # a file that does not decode is not stored
            return data, (image.height, image.width)
        image.draft(None, size)  # JPEG: decoded at 1/2, 1/4 or 1/8 where that stays >= size
        pixels = to_rgb(image)
    if grey:
        pixels = pixels.convert("L")
    if pixels.size != size:
        pixels = pixels.resize(size, Image.Resampling.LANCZOS)  # antialiased
    buffer = io.BytesIO()
    pixels.save(buffer, "JPEG", quality=quality, subsampling="4:2:0")
    return buffer.getvalue(), (pixels.height, pixels.width)


@dataclass(frozen=True)
class Chunk:
    """One part file's work: items (each a tuple of its files: one, or one per view)."""
    number: int
    items: tuple[tuple[str, ...], ...]
    channels: tuple[int | None, ...]
    short_side: int
    quality: int
    strict: bool
    parts: str


def convert(chunk: Chunk) -> int:
    """Write the chunk's part files (bytes, then the record that marks it done); returns its
    number of items. A file that fails to decode is left out and recorded (strict: DataError)."""
    part = Path(chunk.parts) / f"{chunk.number:06d}"
    kept, lengths, sizes, failed = [], [], [], {}
    with open(f"{part}.u8.tmp", "wb") as out:
        for i, files in enumerate(chunk.items):
            encoded = []
            for file, channels in zip(files, chunk.channels):
                try:
                    encoded.append(encode(file, channels, chunk.short_side, chunk.quality))
                # any exception: Pillow's plugins raise OSError, SyntaxError, ValueError, ...
                except Exception as error:  # noqa: BLE001
                    failed[file] = f"{type(error).__name__}: {error}"
                    break
            if file in failed:  # the item (all of a context's views) is left out
                if chunk.strict:
                    raise DataError(f"{file} does not decode ({failed[file]}); remove or "
                                    "replace it, or run without --strict-data to skip it")
                continue
            for data, size in encoded:
                out.write(data)
                lengths.append(len(data))
                sizes.append(size)
            kept.append(i)
    os.replace(f"{part}.u8.tmp", f"{part}.u8")
    _write_json(Path(f"{part}.json"), {"kept": kept, "lengths": lengths, "sizes": sizes,
                                       "failed": failed})
    return len(chunk.items)


def _write_json(path: Path, value) -> None:
    path.with_name(path.name + ".tmp").write_text(json.dumps(value, indent=1))
    os.replace(path.with_name(path.name + ".tmp"), path)


def _save_array(path: Path, array: np.ndarray) -> None:
    with open(path.with_name(path.name + ".tmp"), "wb") as f:
        np.save(f, array)
    os.replace(path.with_name(path.name + ".tmp"), path)


def _listing(source: Path, paired: bool, classes_only: bool, strict: bool) -> dict:
    """What to store, by training's rules: relative files, labels, classes, views, skipped."""
    if paired:
        found = PairedFolder(source, strict)
        files, labels = found.paths, found.labels.tolist()
        views, channels = list(found.names), list(found.channels)
        unmatched = {f"{view}/{path}": "no match in every view"
                     for view, paths in found.unmatched.items() for path in paths}
    else:
        loose = [p for p in source.iterdir()
                 if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        folders = any(p.is_dir() and not p.name.startswith(".") for p in source.iterdir())
        # class folders: the split folders always (as training reads them), SRC when it holds
        # sub-folders only; a folder with images directly in it is an unlabelled collection
        found = (ImageClasses(source, None, strict) if classes_only or (folders and not loose)
                 else ImageFiles(source, None, strict))
        files = [Path(path).relative_to(source).as_posix() for path, _ in found.samples]
        labels, views, channels = [label for _, label in found.samples], None, [None]
        unmatched = {}
    log.info("%s: %d images%s", source, len(files),
             f" in {len(found.classes)} classes" if getattr(found, "classes", None) else "")
    skipped = {Path(f).relative_to(source).as_posix(): problem(f) or "unreadable"
               for f in found.skipped} | unmatched
    return {"files": files, "labels": labels, "classes": getattr(found, "classes", []),
            "views": views, "channels": channels, "skipped": skipped}


def _dataset(src: Path) -> str:
    return (src.parent.name if src.name.lower() in SPLITS else src.name).lower()


def prepare_store(source: Path, target: Path, settings: dict, workers: int, strict: bool,
                  classes_only: bool = False, chunk_size: int = CHUNK) -> Path:
    """One store at `target` from the folder `source` (see prepare), resumed where found."""
    if target.exists() and any(target.iterdir()) and not is_store(target):
        raise ValueError(f"OUT {target} exists and holds other files; pass a new or empty "
                         "folder (or the OUT of an earlier amdim prepare, to resume it)")
    if is_store(target):
        try:
            old = json.loads((target / INFO).read_text())
        except ValueError:
            raise ValueError(f"{target / INFO} is damaged; delete {target} and rerun") from None
        changed = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if changed:
            raise ValueError(f"{target} was prepared with other settings (" + ", ".join(
                f"{k} {a} there, {b} now" for k, (a, b) in changed.items()) + "); rerun with "
                "its settings to resume it, or pass another OUT (or delete it) for these")
        if old.get("complete") is True:
            log.info("%s is already complete", target)
            return target
    parts = target / PARTS
    if (parts / "plan.json").is_file():  # a rerun: the first listing, not a changed folder
        plan = json.loads((parts / "plan.json").read_text())
        if strict and plan["skipped"]:
            name, why = next(iter(plan["skipped"].items()))
            raise DataError(f"{len(plan['skipped'])} unreadable image file(s) in {source} "
                            f"(e.g. {name}: {why}); remove or replace them and delete {target}, "
                            "or run without --strict-data to skip them")
    else:
        plan = {**_listing(source, settings["paired"], classes_only, strict),
                "chunk": chunk_size}
        target.mkdir(parents=True, exist_ok=True)
        _write_json(target / INFO, {**settings, "complete": False})  # before any other file
        parts.mkdir(exist_ok=True)
        _write_json(parts / "plan.json", plan)
    views, chunk_size = plan["views"] or [None], plan["chunk"]  # the first run's chunks
    items = [tuple(str(source / v / f) if v else str(source / f) for v in views)
             for f in plan["files"]]
    chunks = [Chunk(c, tuple(items[start:start + chunk_size]), tuple(plan["channels"]),
                    settings["short_side"], settings["quality"], strict, str(parts))
              for c, start in enumerate(range(0, len(items), chunk_size))]
    todo = [c for c in chunks if not (parts / f"{c.number:06d}.json").is_file()]
    with tqdm(total=len(items), initial=len(items) - sum(len(c.items) for c in todo),
              desc=f"preparing {target.name}", unit="img", mininterval=2.0) as bar:
        if workers == 1 or len(todo) <= 1:
            for c in todo:
                bar.update(convert(c))
        else:
            with multiprocessing.Pool(min(workers, len(todo)), _quiet_worker) as pool:
                for count in pool.imap_unordered(convert, todo):
                    bar.update(count)
    return _join(source, target, settings, plan, len(chunks))


def _quiet_worker() -> None:
    # Ctrl-C reaches every process of the terminal: the main process alone stops the pool
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _join(source: Path, target: Path, settings: dict, plan: dict, n_chunks: int) -> Path:
    """The parts joined into the store's files (streamed from disk), store.json last."""
    parts, chunk_size = target / PARTS, plan["chunk"]
    records = [json.loads((parts / f"{c:06d}.json").read_text()) for c in range(n_chunks)]
    with open(target / "jpeg.u8.tmp", "wb") as out:
        for c in range(n_chunks):
            with open(parts / f"{c:06d}.u8", "rb") as part:
                shutil.copyfileobj(part, out, 16 << 20)
    kept = [c * chunk_size + i for c, record in enumerate(records) for i in record["kept"]]
    failed = {Path(f).relative_to(source).as_posix(): why
              for record in records for f, why in record["failed"].items()}
    for name, why in list(failed.items())[:WARN_FILES]:
        log.warning("skipping unreadable image %s (%s)", source / name, why)
    if not kept:
        raise DataError(f"none of the images in {source} decodes; check that they are images")
    k = len(plan["views"] or [None])
    lengths = [n for record in records for n in record["lengths"]]
    sizes = np.array([s for record in records for s in record["sizes"]], np.int32)
    os.replace(target / "jpeg.u8.tmp", target / "jpeg.u8")
    _save_array(target / "offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    _save_array(target / "labels.npy", np.array(plan["labels"], np.int64)[kept])
    _save_array(target / "sizes.npy", sizes.reshape((len(kept), k, 2) if plan["views"]
                                                    else (len(kept), 2)))
    files = target / "files.txt"
    files.with_name("files.txt.tmp").write_text("".join(plan["files"][i] + "\n" for i in kept))
    os.replace(files.with_name("files.txt.tmp"), files)
    _write_json(target / INFO, {**settings, "dataset": _dataset(source), "images": len(kept),
                                "views": plan["views"],
                                "channels": plan["channels"] if plan["views"] else None,
                                "classes": plan["classes"],
                                "skipped": {**plan["skipped"], **failed}, "complete": True})
    shutil.rmtree(parts)
    return target


def prepare(src, out, short_side: int = DEFAULT_SHORT_SIDE, quality: int = DEFAULT_QUALITY,
            workers: int | None = None, strict: bool = False, paired: bool = False,
            chunk_size: int = CHUNK) -> list[Path]:
    """The stores of the image folder `src` under `out`: `out` itself, or out/train and
    out/val (or test) for a src with train/ and val/ (or test/). Returns their paths.
    Refuses (ValueError) an `out` inside `src`, other settings than an unfinished `out`'s, and
    bad numbers; unreadable files are skipped and named (strict: DataError)."""
    src, out = Path(src).expanduser().resolve(), Path(out).expanduser().resolve()
    if not src.is_dir():
        raise ValueError(f"SRC {src} is not a folder; pass the folder that holds the images")
    if out == src or src in out.parents:
        raise ValueError(f"OUT {out} lies inside SRC {src}; the store would be written among "
                         "the images it is made from: pass a folder outside SRC")
    check_output(out, [src], flag="OUT")
    if short_side < 0 or not 1 <= quality <= 100 or (workers is not None and workers < 1):
        raise ValueError(f"need --short-side >= 0 (got {short_side}), --quality 1..100 (got "
                         f"{quality}) and --workers >= 1 (got {workers})")
    workers = workers or available_cores()
    train = _folder_split(src, ("train",))
    # the test split training reads: val/ before test/ (paired views: test/ alone)
    test = _folder_split(src, ("test", "val") if paired else ("val", "test"))
    splits = [train, test] if train else [src]
    done = []
    for folder in filter(None, splits):
        settings = {"format": FORMAT, "version": VERSION, "source": str(folder),
                    "short_side": short_side, "quality": quality, "paired": paired}
        target = out / folder.name if train else out
        done.append(prepare_store(folder, target, settings, workers, strict,
                                  classes_only=train is not None, chunk_size=chunk_size))
    return done


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "prepare", help="convert an image folder into a memory-mapped store",
        description="Convert an image folder (SRC/train/<class>/ and SRC/val/<class>/, class "
        "folders, a plain folder of images, or with --paired SRC/<view>/<file>) into a store "
        "that --data reads directly: JPEGs of a chosen size in one memory-mapped file, with "
        f"labels and class names ({', '.join(ARRAYS)}, store.json). A SRC with train/ and "
        "val/ (or test/) gives OUT/train and OUT/val. Unreadable files are skipped and named "
        "in store.json. Rerun the same command to resume after an interruption.")
    parser.add_argument("src", help="the image folder (never written to)")
    parser.add_argument("out", help="the store folder to write (outside SRC)")
    parser.add_argument("--short-side", type=int, default=DEFAULT_SHORT_SIDE,
                        help="shorter side in px of the stored images, larger ones resized "
                        "down (antialiased), none up; 0: sizes kept (default "
                        f"{DEFAULT_SHORT_SIDE})")
    parser.add_argument("--quality", type=int, default=DEFAULT_QUALITY,
                        help="JPEG quality of re-encoded images; JPEGs that need no change keep "
                        f"their bytes (default {DEFAULT_QUALITY})")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes (default: the cores this process may use)")
    parser.add_argument("--strict-data", action="store_true",
                        help="stop at the first unreadable image instead of skipping it")
    parser.add_argument("--paired", action="store_true",
                        help="SRC holds one folder per view (<view>/<relative path>), as "
                        "--views paired reads")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    try:
        stores = prepare(args.src, args.out, args.short_side, args.quality, args.workers,
                         args.strict_data, args.paired)
    except (ValueError, DataError) as error:
        raise SystemExit(f"amdim prepare: {error}") from None
    except OSError as error:
        raise SystemExit(f"amdim prepare: cannot read or write {error.filename or args.out} "
                         f"({error.strerror or error})") from None
    for store in stores:
        info = json.loads((store / INFO).read_text())
        log.info("%s: %d images, %.1f MB, %d skipped", store, info["images"],
                 (store / "jpeg.u8").stat().st_size / 1e6, len(info["skipped"]))
