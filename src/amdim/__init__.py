"""AMDIM: Augmented Multiscale Deep InfoMax (Bachman, Hjelm, Buchwalter, NeurIPS 2019)."""
from .classifiers import Classifier, Probes, clipped_cross_entropy
from .encoder import Encoder, EncoderConfig, Features
from .nce import multiscale_nce

__all__ = ["Classifier", "Encoder", "EncoderConfig", "Features", "Probes",
           "clipped_cross_entropy", "multiscale_nce"]
__version__ = "0.1.0"
