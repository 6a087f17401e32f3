"""Dataset mixtures: several named training datasets in one run, each with its weight, batch size, prompts and loss.

Built from config (``data=mixture``, README "Dataset mixtures")::

    train:
      _target_: embedlab.data.mixture.Mixture
      temperature: 1.0
      datasets:
        scifact: {source: {_target_: embedlab.data.BeirSource, ...}, weight: null, batch_size: 32}
        stsb: {source: {_target_: embedlab.data.STSSource, ...}, batch_size: 16, loss: cosent,
               prompt: {query: "sts: ", document: "sts: "}}

The DataModule turns a :class:`Mixture` into one concatenated dataset, a
:class:`~embedlab.data.samplers.MixtureBatchSampler` (one dataset per step, the same on every rank) and a
:class:`MixtureCollate` that prefixes the dataset's prompts and names the batch's dataset
(``batch["dataset"]``), which the LightningModule hands to the loss (``EmbeddedBatch.extras["dataset"]``) so
``loss=by_dataset`` (:class:`~embedlab.losses.routing.LossByDataset`) picks the dataset's loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Sequence

from torch.utils.data import Dataset

from embedlab.data.collate import collate_examples
from embedlab.data.errors import DataError
from embedlab.data.records import Example


class MixtureSource:
    """One dataset of a mixture.

    Args:
        source: a data source (``BeirSource``, ``STSSource``, ``TableSource``) giving ``examples()``.
        weight: sampling weight (see :class:`~embedlab.data.samplers.MixtureBatchSampler`); ``None``: the
            dataset's number of batches per pass (size-proportional).
        batch_size: per-device batch size for this dataset; ``None``: ``data.batch_size``.
        prompt: ``{query: ..., document: ...}`` prefixes for this dataset's texts (queries / first texts,
            and positives + hard negatives / second texts), added in the data layer on top of any model
            prompt (``model.query_prompt`` / ``model.document_prompt``). ``None`` or a missing key: none.
        loss: this dataset's loss for ``loss=by_dataset``: a loss option name (``cosent``, ...), an inline
            loss config, or ``None`` for the default loss. The DataModule only carries it; the loss reads it.
    """

    def __init__(
        self,
        source: Any = None,
        weight: float | None = None,
        batch_size: int | None = None,
        prompt: Mapping | None = None,
        loss: Any = None,
    ) -> None:
        if source is None or not hasattr(source, "examples"):
            raise DataError(f"a mixture dataset needs a `source` with examples() (BeirSource, STSSource, TableSource), got {source!r}")
        self.source = source
        self.weight = None if weight is None else float(weight)
        self.batch_size = None if batch_size is None else int(batch_size)
        prompt = dict(prompt or {})
        unknown = set(prompt) - {"query", "document"}
        if unknown:
            raise DataError(f"a mixture prompt has keys query and document, got {sorted(unknown)}")
        self.query_prompt = prompt.get("query") or ""
        self.document_prompt = prompt.get("document") or ""
        self.loss = loss

    def __repr__(self) -> str:
        return f"MixtureSource({type(self.source).__name__}, weight={self.weight}, batch_size={self.batch_size})"


_ENTRY_KEYS = {"source", "weight", "batch_size", "prompt", "loss"}


class Mixture:
    """Named training datasets sampled one per step.

    Args:
        datasets: ``{name: MixtureSource or {source, weight, batch_size, prompt, loss}}`` (order kept: the
            first is the default evaluation dataset), or a list of one-key mappings.
        temperature: sampling temperature: ``p ∝ weight ** (1 / temperature)``.
        steps_per_epoch: training steps per epoch; ``None``: the sum of every dataset's batches per pass.
        eval_dataset: the dataset a validation split is carved from (``data.val_fraction``) when ``data.val``
            is ``None``; default: the first.
    """

    def __init__(
        self,
        datasets: Mapping[str, Any] | Sequence[Mapping[str, Any]],
        temperature: float = 1.0,
        steps_per_epoch: int | None = None,
        eval_dataset: str | None = None,
    ) -> None:
        if not isinstance(datasets, Mapping):
            merged: dict[str, Any] = {}
            for item in datasets or []:
                merged.update(item)
            datasets = merged
        self.datasets: dict[str, MixtureSource] = {}
        for name, entry in datasets.items():
            if entry is None:  # `~data.train.datasets.x` style removal leaves nothing; a null entry is skipped
                continue
            if not isinstance(entry, MixtureSource):
                if not isinstance(entry, Mapping):
                    raise DataError(f"mixture dataset {name!r}: expected a mapping with a `source`, got {entry!r}")
                unknown = set(entry) - _ENTRY_KEYS
                if unknown:
                    raise DataError(f"mixture dataset {name!r}: unknown keys {sorted(unknown)} (known: {sorted(_ENTRY_KEYS)})")
                entry = MixtureSource(**entry)
            self.datasets[str(name)] = entry
        if not self.datasets:
            raise DataError("a mixture needs at least one dataset (data.train.datasets)")
        if temperature is None or not float(temperature) > 0:
            raise DataError(f"mixture temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.steps_per_epoch = steps_per_epoch
        if eval_dataset is not None and eval_dataset not in self.datasets:
            raise DataError(f"mixture eval_dataset {eval_dataset!r} is not one of {list(self.datasets)}")
        self.eval_dataset = eval_dataset or next(iter(self.datasets))

    @property
    def names(self) -> list[str]:
        return list(self.datasets)

    def load(self, val_fraction: float, seed: int, carve: bool) -> tuple[dict[str, list[Example]], Any]:
        """Every dataset's training examples, and (``carve``) a validation task held out of ``eval_dataset``."""
        examples: dict[str, list[Example]] = {}
        val_task = None
        for name, entry in self.datasets.items():
            if carve and name == self.eval_dataset and val_fraction > 0:
                examples[name], val_task = entry.source.carve(val_fraction, seed)
            else:
                examples[name] = entry.source.examples()
            if not examples[name]:
                raise DataError(f"mixture dataset {name!r} has no training examples")
        return examples, val_task


class MixtureDataset(Dataset):
    """The mixture's datasets concatenated in order; item ``i`` is ``(dataset position, Example)``."""

    def __init__(self, parts: Sequence[Sequence[Example]]) -> None:
        self.items = [(d, e) for d, part in enumerate(parts) for e in part]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, Example]:
        return self.items[i]


class MixtureCollate:
    """Collate one dataset's examples: the usual batch plus ``batch["dataset"]`` and that dataset's prompts.

    Text ids (for masking / duplicate checks) are computed from the texts before the prompts are added.
    """

    def __init__(self, names: Sequence[str], query_prompts: Sequence[str], document_prompts: Sequence[str]) -> None:
        self.names = list(names)
        self.query_prompts = list(query_prompts)
        self.document_prompts = list(document_prompts)

    def __call__(self, items: list[tuple[int, Example]]) -> dict:
        positions = {d for d, _ in items}
        if len(positions) != 1:
            raise DataError(f"a mixture batch mixes datasets {sorted(self.names[d] for d in positions)}")
        d = positions.pop()
        batch = collate_examples([e for _, e in items])
        qp, dp = self.query_prompts[d], self.document_prompts[d]
        if qp:
            batch["query"] = [qp + t for t in batch["query"]]
        if dp:
            batch["positive"] = [dp + t for t in batch["positive"]]
            if batch["negatives"]:
                batch["negatives"] = [dp + t for t in batch["negatives"]]
        batch["dataset"] = self.names[d]
        return batch
