"""AMDIM: Augmented Multiscale Deep InfoMax (Bachman, Hjelm, Buchwalter, NeurIPS 2019)."""
from .config import EncoderConfig
from .evaluation.extract import embed
from .model.backbones import build_encoder
from .model.classifiers import Classifier, Probes, clipped_cross_entropy
from .model.encoder import Encoder, Features
from .model.frozen_features import extract_features
from .model.nce import multiscale_nce
from .training.checkpoint import load_encoder, load_model

__all__ = ["Classifier", "Encoder", "EncoderConfig", "Features", "Probes", "build_encoder",
           "clipped_cross_entropy", "embed", "extract_features", "load_encoder", "load_model",
           "multiscale_nce"]
__version__ = "0.1.0"
