"""Faster dropout for training on CPU: same dropout, a cheaper random-number draw and a leaner attention.

Why: on CPU, PyTorch draws a dropout mask with ``bernoulli_``, a slow per-element draw, and
``scaled_dot_product_attention`` with ``dropout_p > 0`` leaves its fused kernel for the unfused "math" path.
The attention dropout masks are (B, H, L, L) per layer (for all-MiniLM-L6-v2 at batch 32 x 256 tokens,
6 x (32, 12, 256, 256) elements per document forward pass), so dropout dominates a training step.
Here a mask is ``random_()`` on int32 (one cheap 31-bit integer draw per element) compared with a
threshold, and attention with dropout runs one batch element at a time so its (H, L, S) scores
stay in cache. It is the same function: each element is kept with probability 1 - p (p rounded to a
multiple of 2^-31) and scaled by 1 / (1 - p), from torch's default generator, so ``torch.manual_seed``
and the RNG replay of GradCache work as before. Only the random stream differs from ``nn.Dropout``.

Where it applies: CPU tensors in training mode with p > 0. Everything else (evaluation, GPUs, p = 0,
causal or grouped-query attention, soft-capping, sliding windows) goes to PyTorch's own dropout and to
transformers' ``sdpa`` attention unchanged. ``use_fast_cpu_dropout(backbone)`` switches a loaded Hugging
Face model over; the weights and the saved ``config.json`` do not change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ATTN_IMPLEMENTATION = "embedlab_sdpa"
_TWO_31 = 2**31


def keep_mask(shape: tuple[int, ...], p: float, device: torch.device | str | None = None) -> torch.Tensor:
    """Bool mask of ``shape``: True with probability ``1 - p`` (to within 2^-31), from torch's default RNG."""
    draws = torch.empty(shape, dtype=torch.int32, device=device).random_()  # uniform on [0, 2^31 - 1]
    return draws >= round(p * _TWO_31)


class _Dropout(torch.autograd.Function):
    """``x * keep / (1 - p)``; saves only the bool mask for backward (as ``nn.Dropout`` does)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        keep = keep_mask(x.shape, p, x.device)
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return x.masked_fill(~keep, 0).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return grad.masked_fill(~keep, 0).mul_(ctx.scale), None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout`` with the cheaper mask on CPU; PyTorch's own kernel elsewhere or when p is 0 or 1."""
    if not training or p == 0.0 or p >= 1.0 or x.device.type != "cpu":
        return F.dropout(x, p, training)
    return _Dropout.apply(x, p)


class FastDropout(nn.Dropout):
    """Drop-in ``nn.Dropout`` (same ``p``, no parameters) that uses :func:`dropout`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return F.dropout(x, self.p, self.training, inplace=True)
        return dropout(x, self.p, self.training)


class _DropoutAttention(torch.autograd.Function):
    """``dropout(softmax(q k^T * scale + mask)) v``, one batch element at a time.

    Inputs: q, k, v (B, H, L|S, d); mask None, bool (True = attend) or additive float, broadcastable to
    (B, H, L, S). Output (B, L, H, d), the layout transformers' attention functions return. Saves the
    probabilities and the keep mask, as the unfused path does, and computes the gradient by hand:
    dP = dO v^T * keep / (1 - p);  dS = P * (dP - rowsum(dP * P));  dq = dS k * scale;  dk = dS^T q * scale.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, p: float, scale: float):
        batch, heads, length, head_dim = q.shape
        out = q.new_empty(batch, length, heads, head_dim)
        probs = q.new_empty(batch, heads, length, k.shape[2])
        keeps = torch.empty(probs.shape, dtype=torch.bool, device=q.device)
        drop_scale = 1.0 / (1.0 - p)
        for i in range(batch):
            scores = torch.matmul(q[i], k[i].transpose(-1, -2)).mul_(scale)  # (H, L, S)
            if mask is not None:
                m = mask[i] if mask.shape[0] > 1 else mask[0]
                if m.dtype == torch.bool:
                    scores.masked_fill_(~m, float("-inf"))
                else:
                    scores.add_(m)
            torch.softmax(scores, dim=-1, out=probs[i])
            keeps[i] = keep_mask(scores.shape, p, q.device)
            dropped = probs[i].masked_fill(~keeps[i], 0).mul_(drop_scale)
            out[i] = torch.matmul(dropped, v[i]).transpose(0, 1)  # (L, H, d)
        ctx.save_for_backward(q, k, v, probs, keeps)
        ctx.scale, ctx.drop_scale = scale, drop_scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, probs, keeps = ctx.saved_tensors
        scale, drop_scale = ctx.scale, ctx.drop_scale
        grad_out = grad_out.transpose(1, 2)  # (B, H, L, d)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for i in range(q.shape[0]):
            prob, not_kept, g = probs[i], ~keeps[i], grad_out[i]
            dropped = prob.masked_fill(not_kept, 0).mul_(drop_scale)  # (H, L, S)
            dv[i] = torch.matmul(dropped.transpose(-1, -2), g)
            d_prob = torch.matmul(g, v[i].transpose(-1, -2)).masked_fill_(not_kept, 0).mul_(drop_scale)
            d_scores = d_prob.sub_((d_prob * prob).sum(-1, keepdim=True)).mul_(prob)
            dq[i] = torch.matmul(d_scores, k[i]).mul_(scale)
            dk[i] = torch.matmul(d_scores.transpose(-1, -2), q[i]).mul_(scale)
        return dq, dk, dv, None, None, None


# keyword arguments that mean a variant this kernel does not implement
_UNSUPPORTED = ("softcap", "sliding_window", "s_aux", "position_bias")


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention function: :class:`_DropoutAttention` for CPU training with dropout, else ``sdpa``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plain = (
        dropout == 0.0
        or query.device.type != "cpu"
        or getattr(module, "is_causal", False)
        or key.shape[1] != query.shape[1]
        or any(kwargs.get(name) is not None for name in _UNSUPPORTED)
    )
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    return _DropoutAttention.apply(query, key, value, attention_mask, float(dropout), float(scaling)), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)  # the masks sdpa gets


def use_fast_cpu_dropout(backbone: nn.Module) -> nn.Module:
    """Switch a Hugging Face model to :class:`FastDropout` and, if it runs ``sdpa``, to :func:`attention`.

    In place; returns ``backbone``. Models on another attention implementation (eager, flash) keep it.
    """
    for parent in backbone.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, FastDropout(child.p, child.inplace))
    config = getattr(backbone, "config", None)
    if config is not None and getattr(config, "_attn_implementation", None) == "sdpa":
        _register()
        backbone.set_attn_implementation(ATTN_IMPLEMENTATION)
    return backbone
