"""AMDIM: Augmented Multiscale Deep InfoMax (Bachman, Hjelm, Buchwalter, NeurIPS 2019)."""
from __future__ import annotations

import importlib

# each public name and the module that holds it, imported on first use: `amdim` on the command
# line starts (and can be interrupted) before torch is imported
_WHERE = {"EncoderConfig": "config", "embed": "evaluation.extract",
          "build_encoder": "model.backbones", "Classifier": "model.classifiers",
          "Probes": "model.classifiers", "clipped_cross_entropy": "model.classifiers",
          "Encoder": "model.encoder", "Features": "model.encoder",
          "extract_features": "model.frozen_features", "multiscale_nce": "model.nce",
          "load_encoder": "training.checkpoint", "load_model": "training.checkpoint"}
__all__ = sorted(_WHERE)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'amdim' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
