"""Plain ``nn.Module`` model components: backbone, pooling, normalization, bi-encoder, cross-encoder;
checkpoint loading."""

from embedlab.models import cpu_dropout
from embedlab.models.bi_encoder import BiEncoder, Normalize, Transformer
from embedlab.models.checkpoint import load_checkpoint, safe_load
from embedlab.models.cross_encoder import CrossEncoder
from embedlab.models.errors import ModelLoadError
from embedlab.models.pooling import Pooling
from embedlab.models.student import layer_reduced
from embedlab.models.tiny import tiny_bi_encoder, tiny_cross_encoder

__all__ = [
    "BiEncoder",
    "cpu_dropout",
    "CrossEncoder",
    "ModelLoadError",
    "Normalize",
    "Pooling",
    "Transformer",
    "layer_reduced",
    "load_checkpoint",
    "safe_load",
    "tiny_bi_encoder",
    "tiny_cross_encoder",
]
