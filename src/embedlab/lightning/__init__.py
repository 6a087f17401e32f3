"""LightningModules (steps, logging, optimizers) around the plain model components."""

from embedlab.lightning.module import BiEncoderModule

__all__ = ["BiEncoderModule"]
