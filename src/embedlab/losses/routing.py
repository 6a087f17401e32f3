"""Per-dataset losses for dataset mixtures: dispatch each batch to its dataset's loss."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from embedlab.errors import UserError
from embedlab.losses.base import EmbeddedBatch


def _is_config(value: Any) -> bool:
    return isinstance(value, Mapping) and "_target_" in value


def _build(value: Any) -> nn.Module:
    if _is_config(value):
        from hydra.utils import instantiate

        value = instantiate(value)
    if not callable(value):
        raise TypeError(f"a loss must be a callable module or a config with _target_, got {value!r}")
    return value


class LossByDataset(nn.Module):
    """A pure loss that hands each batch to the loss of the dataset it came from.

    The batch's dataset is ``batch.extras["dataset"]`` (mixture batches name it; see
    :mod:`embedlab.data.mixture`). A batch without a dataset name, or of a dataset with no loss of its own,
    uses ``default``. The chosen loss's terms are returned unchanged (``loss``, ``mnrl``, ``cosent``, ...:
    the same names, hence the same ``train/<term>`` keys, as when that loss is used alone), plus
    ``loss@<dataset>`` (detached) so each dataset's loss has its own curve.

    Under DDP every rank must call the same loss in the same step (a loss gathering across devices runs
    collectives): the mixture sampler draws the same dataset on every rank, which guarantees it.

    Args:
        default: the loss of batches without a dataset-specific one (a module or a config with ``_target_``).
        losses: ``{dataset name: loss}`` (the names of the mixture's datasets, ``data.train.datasets``); a loss
            is a module, a config with ``_target_``, or the name of one of ``options``; ``None``: ``default``.
        options: ``{name: loss}`` that names refer to (the config lists mnrl, cosent, cosine, contrastive,
            triplet from ``configs/loss``); only the ones used are built.
    """

    def __init__(
        self,
        default: Any,
        losses: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        options = dict(options or {})
        self.default = _build(default)
        wanted = {str(k): v for k, v in (losses or {}).items() if v is not None}

        built: dict[str, nn.Module] = {}  # option name -> module, so datasets naming one option share it
        self.routes: dict[str, str] = {}  # dataset name -> key in self.by_key
        self.by_key = nn.ModuleDict()
        for dataset, spec in wanted.items():
            if isinstance(spec, str):
                if spec not in options:
                    raise UserError(f"loss.losses.{dataset}: unknown loss {spec!r}; options: {sorted(options)}")
                if spec not in built:
                    built[spec] = _build(options[spec])
                module = built[spec]
            else:
                module = _build(spec)
            key = f"loss{len(self.by_key)}"
            for existing, m in self.by_key.items():
                if m is module:
                    key = existing
                    break
            else:
                self.by_key[key] = module
            self.routes[dataset] = key

    def loss_for(self, dataset: str | None) -> nn.Module:
        """The loss a batch of ``dataset`` (``None``: unnamed) is handed to."""
        key = self.routes.get(dataset) if dataset is not None else None
        return self.by_key[key] if key is not None else self.default

    def forward(self, batch: EmbeddedBatch) -> dict[str, torch.Tensor]:
        dataset = batch.extras.get("dataset") if batch.extras else None
        terms = dict(self.loss_for(dataset)(batch))
        if dataset is not None:
            terms[f"loss@{dataset}"] = terms["loss"].detach()
        return terms

    def extra_repr(self) -> str:
        return f"routes={ {d: type(self.by_key[k]).__name__ for d, k in self.routes.items()} }"
