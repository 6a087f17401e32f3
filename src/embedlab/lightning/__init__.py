"""LightningModules (steps, logging, optimizers, their evaluation) around the plain model components."""

from embedlab.lightning.base import EmbedlabModule, NonFiniteLossError
from embedlab.lightning.cross_encoder import CrossEncoderModule
from embedlab.lightning.distillation import DistillationModule
from embedlab.lightning.module import BiEncoderModule

__all__ = ["BiEncoderModule", "CrossEncoderModule", "DistillationModule", "EmbedlabModule", "NonFiniteLossError"]
