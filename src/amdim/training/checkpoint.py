"""Checkpoints: written atomically, read with `weights_only=True`, ours and the authors'.

Our format (a dict of tensors and plain values only):
    format: "amdim/1", config: PretrainConfig.to_dict(), n_classes: int (0: no probes),
    encoder / probes / mixture_head / optimizer / scaler: state dicts (probes and
    mixture_head None when absent), epoch: epochs completed, step_in_epoch: steps of the
    next epoch already taken, step: optimiser steps taken, rng: one {"torch": ByteTensor,
    "cuda": ByteTensor or None} per rank, data_path: "device" or "loader", epoch_sums: the
    running sums of the epoch's metrics, skipped_batches: non-finite batches skipped,
    data_fingerprint: {"train_images": N, "n_classes": C} of the data it was trained on.
Every file we write also holds digest: the SHA-256 of its tensors (see `digest`), checked on
load, so that flipped bytes are found rather than trained on; files without one (the
authors', older ones) load as before.
An encoder-only file (`amdim export`): format "amdim-encoder/1", config, encoder,
mixture_head (None without), digest.
Runs of --views lab or paired also hold views: {"names", "channels", "shared"}, and their
encoder state is that of one encoder per view (keys <view>.*) unless shared.
The authors' format (amdim-public): model (encoder.module.*, evaluator.*), hyperparams, cursor.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from pathlib import Path

import torch

from ..config import EncoderConfig, PretrainConfig
from ..model.backbones import build_encoder
from ..model.classifiers import Probes
from ..model.encoder import Encoder

FORMAT = "amdim/1"
ENCODER_FORMAT = "amdim-encoder/1"
# the configuration fields an encoder is rebuilt from (a file lacking one cannot be read)
ARCHITECTURE = ("image_size", "ndf", "n_rkhs", "n_depth", "use_bn")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with what to do about it."""


def digest(state) -> str:
    """SHA-256 over every tensor in `state` (nested dicts, in sorted key order, and lists),
    each as its key path, dtype, shape and bytes; other values do not count."""
    sha = hashlib.sha256()

    def visit(value, name: str) -> None:
        if isinstance(value, torch.Tensor):
            flat = value.detach().cpu().contiguous().reshape(-1)
            sha.update(f"{name}|{flat.dtype}|{tuple(value.shape)}|".encode())
            sha.update(flat.view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                if not (name == "" and key == "digest"):
                    visit(value[key], f"{name}/{key}")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                visit(item, f"{name}/{i}")

    visit(state, "")
    return sha.hexdigest()


def save_atomic(state: dict, path: str | os.PathLike) -> None:
    """Write `state` with its digest to a temporary file in the same folder, fsync, then
    rename over `path`: a crash mid-write leaves the previous file intact."""
    path = Path(path)
    state = {**state, "digest": digest(state)}
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load(path: str | os.PathLike) -> dict:
    """Read a checkpoint without unpickling arbitrary objects (weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError) as error:
        # torch's message advises weights_only=False; we never do that, so keep only its cause
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated, corrupt, or holding objects other "
            f"than tensors and plain values, which are never unpickled): {reason}") from None
    if not isinstance(state, dict) or not ({"format", "model"} & set(state)):
        raise CheckpointError(f"{path} is neither an amdim checkpoint nor one of the authors'")
    if "digest" in state and digest(state) != state["digest"]:
        raise CheckpointError(
            f"{path} is corrupt: its tensors do not match the SHA-256 digest stored with them "
            "(bytes changed on disk or in a copy); use another copy of the file")
    return state


def is_authors(state: dict) -> bool:
    return "model" in state and "hyperparams" in state


def _strip(state_dict: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def load_model(path: str | os.PathLike, view: str | None = None
               ) -> tuple[Encoder, Probes | None, dict]:
    """Encoder (eval mode), online probes (None without labels) and the checkpoint dict, from
    either format. view: for a checkpoint of --views lab or paired (required there), the
    view whose encoder and probes to return, or "all" (multiview.ViewsEncoder: every view's
    global feature, concatenated); None for a checkpoint of --views augment."""
    state = load(path)
    try:
        if is_authors(state):
            h = state["hyperparams"]
            cfg = EncoderConfig(image_size=h["encoder_size"], ndf=h["ndf"], n_rkhs=h["n_rkhs"],
                                n_depth=h["n_depth"], use_bn=bool(h["use_bn"]))
            encoder_state = _strip(state["model"], "encoder.module.")
            probe_state, n_classes = _strip(state["model"], "evaluator."), h["n_classes"]
        elif state.get("format") in (FORMAT, ENCODER_FORMAT):
            missing = [k for k in ARCHITECTURE if k not in state["config"]]
            if missing:
                raise CheckpointError(f"{path}: its config lacks the field(s) {missing}, needed "
                                      "to rebuild the encoder")
            cfg = PretrainConfig.from_dict(state["config"]).encoder
            encoder_state = state["encoder"]
            probe_state, n_classes = state.get("probes"), state.get("n_classes", 0)
        else:
            raise CheckpointError(f"{path} has format {state.get('format')!r}; this amdim "
                                  f"reads {FORMAT}, {ENCODER_FORMAT} and the authors' format")
    except (KeyError, ValueError, TypeError) as error:
        raise CheckpointError(f"{path} has an incomplete or invalid configuration: "
                              f"{type(error).__name__}: {error}") from None
    layout = None if is_authors(state) else state.get("views")
    if layout is not None:
        return (*_view_model(path, state, layout, view), state)
    if view is not None:
        raise CheckpointError(f"{path} holds one encoder of two augmented views of each image "
                              f"(--views augment), no view {view!r}: load it without a view")
    encoder = build_encoder(cfg)  # the paper's encoder or the backbone the config names
    probes = Probes(cfg.n_rkhs, n_classes) if n_classes else None
    try:
        encoder.load_state_dict(encoder_state)
        if probes is not None:
            probes.load_state_dict(probe_state)
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not match the model its config describes: {error}") from None
    return encoder.eval(), (probes.eval() if probes is not None else None), state


def load_encoder(path: str | os.PathLike, view: str | None = None) -> Encoder:
    """A trained encoder in eval mode, from our checkpoint or the authors', in one line.
    view: for a checkpoint of --views lab or paired, which view's encoder, or "all"."""
    return load_model(path, view)[0]


def _view_model(path, state: dict, layout: dict, view: str | None):
    """(encoder, probes) of a multiview checkpoint for `view` (see load_model)."""
    from ..model.multiview import ALL, MultiViewAMDIM, ViewsEncoder

    names = layout["names"]
    if view is None:  # which images the encoder takes is the view's business: never guessed
        kind = "one encoder shared by" if layout["shared"] else "one encoder per view of"
        raise CheckpointError(f"{path} holds {kind} the views {', '.join(names)}: pass "
                              "view=NAME (amdim extract or evaluate --view NAME), or view='all' "
                              "(--view all) for every view's features together")
    if view not in (None, ALL, *names):
        raise CheckpointError(f"{path} has no view {view!r}; its views are "
                              f"{', '.join(names)} (or {ALL})")
    try:
        model = MultiViewAMDIM(PretrainConfig.from_dict(state["config"]),
                               state.get("n_classes", 0), layout)
        model.encoder.load_state_dict(state["encoder"])
        if model.probes is not None:
            model.probes.load_state_dict(state["probes"])
    except (KeyError, ValueError, TypeError, RuntimeError) as error:
        raise CheckpointError(f"{path} does not match the views it describes: "
                              f"{type(error).__name__}: {error}") from None
    model.eval()
    probes = model.probes[view] if model.probes is not None else None
    if view == ALL:
        return ViewsEncoder(model).eval(), probes
    return model.encoder_of(view), probes


def export_encoder(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the encoder of a checkpoint (ours or the authors') alone, with its config and
    digest, to `out`: the file to share (no optimiser state, probes or random streams);
    load_encoder reads it."""
    state = load(path)
    if not is_authors(state) and state.get("views") is not None:  # every view's encoder
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        _view_model(path, state, state["views"], "all")  # refuses a mismatched file
        save_atomic({"format": ENCODER_FORMAT, "config": state["config"],
                     "encoder": state["encoder"], "views": state["views"],
                     "mixture_head": state.get("mixture_head"),
                     "data_fingerprint": state.get("data_fingerprint")}, out)
        return out
    encoder, _, state = load_model(path)
    if is_authors(state):
        # the architecture only: their data is not recorded (--data says it later)
        config = {k: getattr(encoder.cfg, k) for k in ARCHITECTURE}
    else:
        config = state["config"]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_atomic({"format": ENCODER_FORMAT, "config": config, "encoder": encoder.state_dict(),
                 "mixture_head": state.get("mixture_head"),  # amdim segment draws it
                 "data_fingerprint": state.get("data_fingerprint")}, out)
    return out
