"""Pooling: token embeddings (B, L, H) + attention mask (B, L) -> sentence embedding (B, H).

Every mode is mask-aware: padded positions never contribute, whatever side the tokenizer pads on.
The modes and their names match sentence-transformers' ``Pooling`` module so a saved model round-trips.
"""

from __future__ import annotations

import torch
from torch import nn

from embedlab.errors import ConfigError

#: ``pooling`` value meaning "as the model folder records" (mean when it records nothing)
AUTO = "auto"

#: embedlab mode -> sentence-transformers ``1_Pooling/config.json`` flag
ST_POOLING_FLAGS = {
    "mean": "pooling_mode_mean_tokens",
    "cls": "pooling_mode_cls_token",
    "max": "pooling_mode_max_tokens",
    "weighted_mean": "pooling_mode_weightedmean_tokens",
    "last_token": "pooling_mode_lasttoken",
}


class Pooling(nn.Module):
    """Reduce token embeddings to one vector per text.

    Args:
        mode: ``mean`` (average of non-padding tokens, sentence-transformers' default),
            ``cls`` (first token; BERT-style models), ``max`` (element-wise max over non-padding tokens),
            ``weighted_mean`` (position-weighted mean, weight i for the i-th token: SGPT, Muennighoff 2022),
            ``last_token`` (hidden state of the last non-padding token; decoder-only embedders such as
            E5-Mistral).
    """

    MODES = tuple(ST_POOLING_FLAGS)

    def __init__(self, mode: str = "mean") -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ConfigError(f"pooling mode {mode!r} is not one of {', '.join(self.MODES)}")
        self.mode = mode

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"

    def forward(self, token_embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # token_embeddings (B, L, H), attention_mask (B, L) of 0/1
        mask = attention_mask.unsqueeze(-1).to(token_embeddings.dtype)  # (B, L, 1)
        if self.mode == "mean":
            summed = (token_embeddings * mask).sum(1)  # (B, H)
            return summed / mask.sum(1).clamp(min=1e-9)
        if self.mode == "weighted_mean":
            # the k-th real token weighs k (counted from the first real token, so left padding changes
            # nothing; equal to sentence-transformers' absolute positions for right padding); padding weighs 0
            weights = attention_mask.cumsum(1).unsqueeze(-1).to(mask.dtype) * mask  # (B, L, 1)
            return (token_embeddings * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        if self.mode == "max":
            # padded positions can never win the max
            filled = token_embeddings.masked_fill(mask == 0, torch.finfo(token_embeddings.dtype).min)
            return filled.max(1).values
        if self.mode == "cls":
            # first real token: position 0 with right padding, after the padding with left padding
            first = attention_mask.long().argmax(1)  # (B,)
            return token_embeddings[torch.arange(token_embeddings.shape[0], device=first.device), first]
        # last_token: index of the last 1 in the mask, correct for left and right padding
        length = attention_mask.shape[1]
        positions = torch.arange(length, device=attention_mask.device).expand_as(attention_mask)
        last = (positions * attention_mask.long()).argmax(1)  # (B,)
        return token_embeddings[torch.arange(token_embeddings.shape[0], device=last.device), last]


def folder_pooling() -> str:
    """The ``_target_`` of ``pooling=auto``: no :class:`Pooling` object but the marker ``"auto"``, which
    makes :meth:`~embedlab.models.BiEncoder.from_pretrained` use the pooling the model folder records."""
    return AUTO
