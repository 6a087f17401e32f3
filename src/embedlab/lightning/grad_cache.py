"""GradCache: in-batch-negative losses over batches larger than activation memory allows.

Gao, Zhang, Han & Callan 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup".
A loss over a batch of B texts needs all B embeddings at once, but not all B activation graphs:

1. embed the batch in mini-batches without a graph (``torch.no_grad``), remembering each mini-batch's RNG
   state;
2. compute the loss on the full batch of (detached, ``requires_grad``) embeddings and its gradient with
   respect to the embeddings only;
3. re-embed each mini-batch with a graph, under the RNG state of step 1 (the same dropout masks), and
   backpropagate ``sum(embedding * d loss / d embedding)``: its parameter gradient is the mini-batch's
   share of ``d loss / d parameters`` (chain rule), so the summed gradient equals the full-batch one.

Memory: activations of one mini-batch, plus B embeddings. Cost: one extra forward pass.

The loss stays a pure function of embeddings and is any loss: GradCache is a property of the training step
(``BiEncoderModule(grad_cache_mini_batch_size=...)``), not of the objective. :class:`GradCacheLoss` only
carries the option inside a loss config (``loss=cached_mnrl``); the module looks for it.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import get_device_states, set_device_states

from embedlab.errors import ConfigError
from embedlab.losses.base import EmbeddedBatch
from embedlab.losses.contrastive import MultipleNegativesRankingLoss

Features = dict[str, torch.Tensor]


class RandContext:
    """Capture the RNG state now; ``with ctx:`` replays it (CPU and the CUDA devices of ``tensors``).

    Leaving the block restores the RNG state from before it, so replaying does not disturb later random
    numbers (sentence-transformers' ``RandContext``; torch.utils.checkpoint does the same).
    """

    def __init__(self, *tensors: torch.Tensor) -> None:
        self.cpu_state = torch.get_rng_state()
        self.devices, self.device_states = get_device_states(*tensors)
        self._fork = None

    def __enter__(self) -> None:
        self._fork = torch.random.fork_rng(devices=self.devices, enabled=True)
        self._fork.__enter__()
        torch.set_rng_state(self.cpu_state)
        set_device_states(self.devices, self.device_states)

    def __exit__(self, *exc) -> None:
        self._fork.__exit__(*exc)
        self._fork = None


def split_features(features: Features, size: int) -> list[Features]:
    """Tokenized batch -> consecutive row slices of at most ``size`` rows (same padding as the full batch)."""
    n = next(iter(features.values())).shape[0]
    return [{k: v[s : s + size] for k, v in features.items()} for s in range(0, n, size)]


def grad_cache_backward(
    encode: Callable[[Features], torch.Tensor],
    sides: Sequence[Features],
    assemble: Callable[[list[torch.Tensor]], EmbeddedBatch],
    loss: Callable[[EmbeddedBatch], dict[str, torch.Tensor]],
    mini_batch_size: int,
    backward: Callable[..., None] = torch.Tensor.backward,
    loss_scale: float = 1.0,
    loss_parameters: Sequence[torch.Tensor] = (),
) -> dict[str, torch.Tensor]:
    """One GradCache step: parameter gradients of ``loss_scale * loss`` accumulated into ``.grad``.

    Args:
        encode: tokenized features -> embeddings (the model's forward, with a graph when grad is on).
        sides: the tokenized texts of the batch, one entry per encoder call of the plain step (queries,
            documents); each is cut into mini-batches of ``mini_batch_size`` rows.
        assemble: the embeddings of every side (full length, in order) -> the loss's :class:`EmbeddedBatch`.
        loss: the loss (any; it may gather across devices: its backward runs in step 2 on every rank).
        backward: how to backpropagate a mini-batch's surrogate (the module passes ``manual_backward``,
            so precision plugins scale it).
        loss_scale: factor on the gradient (1 / accumulation steps).
        loss_parameters: trainable parameters between the embeddings and the loss (a distillation projection, a
            learned scale): step 2 backpropagates into them too (``backward(..., inputs=...)``), as the plain step would.

    Returns the loss terms, detached.
    """
    if mini_batch_size < 1:
        raise ConfigError(f"GradCache mini_batch_size must be >= 1, got {mini_batch_size}")
    # 1. embeddings without a graph, each mini-batch's RNG state remembered for the replay
    chunks: list[list[tuple[Features, RandContext]]] = []
    leaves: list[torch.Tensor] = []
    for features in sides:
        parts, outs = [], []
        for chunk in split_features(features, mini_batch_size):
            state = RandContext(*chunk.values())
            with torch.no_grad():
                outs.append(encode(chunk))
            parts.append((chunk, state))
        chunks.append(parts)
        leaves.append(torch.cat(outs).detach().requires_grad_())
    # 2. the loss on the full batch; gradients with respect to the embeddings only
    terms = loss(assemble(leaves))
    scaled = terms["loss"] * loss_scale
    params = [p for p in loss_parameters if p.requires_grad]
    grads = torch.autograd.grad(scaled, leaves, allow_unused=True, retain_graph=bool(params))
    if params:  # their whole gradient comes from this one graph; `backward` keeps AMP's loss scaling
        backward(scaled, inputs=params)
    # 3. replay each mini-batch with a graph and push its slice of the embedding gradient into the model
    for parts, grad in zip(chunks, grads):
        if grad is None:  # the loss does not use this side
            continue
        start = 0
        for chunk, state in parts:
            with state:
                emb = encode(chunk)
            n = emb.shape[0]
            backward((emb * grad[start : start + n].to(emb.dtype)).sum())
            start += n
    return {name: value.detach() for name, value in terms.items()}


class GradCacheLoss(nn.Module):
    """A loss plus the GradCache mini-batch size the module trains it with (``loss=cached_mnrl``).

    The forward is the wrapped loss unchanged: GradCache changes how gradients are computed, not the
    objective, so the loss value and gradients equal the plain step's (tests/test_grad_cache.py).
    """

    def __init__(self, loss: nn.Module, mini_batch_size: int = 32) -> None:
        super().__init__()
        if int(mini_batch_size) < 1:
            raise ConfigError(f"GradCache mini_batch_size must be >= 1, got {mini_batch_size}")
        self.loss = loss
        self.mini_batch_size = int(mini_batch_size)

    def forward(self, batch: EmbeddedBatch) -> dict[str, torch.Tensor]:
        return self.loss(batch)

    def __getattr__(self, name: str):
        # the wrapped loss's other methods (e.g. mnrl's forward_with_logits, which Matryoshka distillation uses)
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "loss":
                raise
            return getattr(super().__getattr__("loss"), name)


def cached_mnrl(mini_batch_size: int = 32, **mnrl_options) -> GradCacheLoss:
    """:class:`MultipleNegativesRankingLoss` (``mnrl_options``) trained with GradCache (CachedMNRL)."""
    return GradCacheLoss(MultipleNegativesRankingLoss(**mnrl_options), mini_batch_size)


def find_mini_batch_size(loss: nn.Module) -> int | None:
    """The mini-batch size of a :class:`GradCacheLoss` anywhere in ``loss`` (e.g. inside Matryoshka), else None."""
    for module in loss.modules():
        if isinstance(module, GradCacheLoss):
            return module.mini_batch_size
    return None
