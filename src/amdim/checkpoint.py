"""Checkpoints: written atomically, read with `weights_only=True`, ours and the authors'.

Our format (a dict of tensors and plain values only):
    format: "amdim/1", config: PretrainConfig.to_dict(), n_classes: int (0: no probes),
    encoder / probes / mixture_head / optimizer / scaler: state dicts (probes and
    mixture_head None when absent), epoch: epochs completed, step_in_epoch: steps of the
    next epoch already taken, step: optimiser steps taken, rng: one {"torch": ByteTensor,
    "cuda": ByteTensor or None} per rank, data_path: "device" or "loader", epoch_sums: the
    running sums of the epoch's metrics, skipped_batches: non-finite batches skipped.
The authors' format (amdim-public): model (encoder.module.*, evaluator.*), hyperparams, cursor.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch

from .classifiers import Probes
from .config import PretrainConfig
from .backbones import build_encoder
from .encoder import Encoder, EncoderConfig

FORMAT = "amdim/1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with what to do about it."""


def save_atomic(state: dict, path: str | os.PathLike) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`: a crash
    mid-write leaves the previous file intact."""
    path = Path(path)
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
    return state


def is_authors(state: dict) -> bool:
    return "model" in state and "hyperparams" in state


def _strip(state_dict: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def load_model(path: str | os.PathLike) -> tuple[Encoder, Probes | None, dict]:
    """Encoder (eval mode), online probes (None without labels) and the checkpoint dict, from
    either format."""
    state = load(path)
    try:
        if is_authors(state):
            h = state["hyperparams"]
            cfg = EncoderConfig(image_size=h["encoder_size"], ndf=h["ndf"], n_rkhs=h["n_rkhs"],
                                n_depth=h["n_depth"], use_bn=bool(h["use_bn"]))
            encoder_state = _strip(state["model"], "encoder.module.")
            probe_state, n_classes = _strip(state["model"], "evaluator."), h["n_classes"]
        elif state.get("format") == FORMAT:
            cfg = PretrainConfig.from_dict(state["config"]).encoder
            encoder_state, probe_state = state["encoder"], state["probes"]
            n_classes = state["n_classes"]
        else:
            raise CheckpointError(f"{path} has format {state.get('format')!r}; this amdim "
                                  f"reads {FORMAT} and the authors' format")
    except (KeyError, ValueError, TypeError) as error:
        raise CheckpointError(f"{path} has an incomplete or invalid configuration: "
                              f"{type(error).__name__}: {error}") from None
    encoder = build_encoder(cfg)  # the paper's encoder or the backbone the config names
    probes = Probes(cfg.n_rkhs, n_classes) if n_classes else None
    try:
        encoder.load_state_dict(encoder_state)
        if probes is not None:
            probes.load_state_dict(probe_state)
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not match the model its config describes: {error}") from None
    return encoder.eval(), (probes.eval() if probes is not None else None), state


def load_encoder(path: str | os.PathLike) -> Encoder:
    """A trained encoder in eval mode, from our checkpoint or the authors', in one line."""
    return load_model(path)[0]
