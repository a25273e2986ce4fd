"""AMDIM: Augmented Multiscale Deep InfoMax (Bachman, Hjelm, Buchwalter, NeurIPS 2019)."""
from .backbones import build_encoder
from .checkpoint import load_encoder, load_model
from .classifiers import Classifier, Probes, clipped_cross_entropy
from .encoder import Encoder, EncoderConfig, Features
from .extract import embed, extract_features
from .nce import multiscale_nce

__all__ = ["Classifier", "Encoder", "EncoderConfig", "Features", "Probes", "build_encoder",
           "clipped_cross_entropy", "embed", "extract_features", "load_encoder", "load_model",
           "multiscale_nce"]
__version__ = "0.1.0"
