"""Plain ``nn.Module`` model components: backbone, pooling, normalization, bi-encoder."""

from embedlab.models import cpu_dropout
from embedlab.models.bi_encoder import BiEncoder, ModelLoadError, Normalize, Transformer, load_checkpoint
from embedlab.models.pooling import Pooling
from embedlab.models.tiny import tiny_bi_encoder

__all__ = ["BiEncoder", "cpu_dropout", "ModelLoadError", "Normalize", "Pooling", "Transformer", "load_checkpoint", "tiny_bi_encoder"]
