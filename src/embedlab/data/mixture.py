"""Dataset mixtures: several named training datasets in one run, each with its weight, batch size and prompts.

Built from config (``data=mixture``, docs/mixtures.md)::

    train:
      _target_: embedlab.data.mixture.Mixture
      temperature: 1.0
      datasets:
        scifact: {source: {_target_: embedlab.data.BeirSource, ...}, weight: null, batch_size: 32}
        stsb: {source: {_target_: embedlab.data.STSSource, ...}, batch_size: 16,
               prompt: {query: "sts: ", document: "sts: "}}

The DataModule turns a :class:`Mixture` into one concatenated dataset, a
:class:`~embedlab.data.samplers.MixtureBatchSampler` (one dataset per step, the same on every rank) and a
:class:`MixtureCollate` that prefixes the dataset's prompts and names the batch's dataset
(``batch["dataset"]``). The data layer yields data only: a per-dataset loss is set in the loss config
(``loss=by_dataset loss.losses={stsb: cosent}``), which reads the dataset name from the batch.
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
    """

    def __init__(
        self,
        source: Any = None,
        weight: float | None = None,
        batch_size: int | None = None,
        prompt: Mapping | None = None,
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

    def __repr__(self) -> str:
        return f"MixtureSource({type(self.source).__name__}, weight={self.weight}, batch_size={self.batch_size})"


_ENTRY_KEYS = ("source", "weight", "batch_size", "prompt")


def check_temperature(temperature: Any) -> float:
    """The mixture sampling temperature as a float, or a DataError: ``p ∝ weight ** (1 / temperature)``
    needs a positive number."""
    try:
        value = None if isinstance(temperature, bool) else float(temperature)
    except (TypeError, ValueError):
        value = None
    if value is None or not value > 0:  # `not >` also refuses NaN
        raise DataError(f"mixture temperature must be a number > 0, got {temperature!r}")
    return value


def _entry_loss_error(name: str, loss: Any) -> DataError:
    # The data layer yields data only: a loss per dataset belongs to the loss config. Say where it goes,
    # with the entry's own value when it is an option name.
    shown = loss if isinstance(loss, str) and loss else "<loss>"
    return DataError(
        f"mixture dataset {name!r}: a mixture entry takes no `loss`; set the loss per dataset in the loss config: "
        f"loss=by_dataset loss.losses={{{name}: {shown}}}"
    )


class Mixture:
    """Named training datasets sampled one per step.

    Args:
        datasets: ``{name: MixtureSource or {source, weight, batch_size, prompt}}`` (order kept: the
            first is the default evaluation dataset), or a list of one-key mappings. A ``null`` entry is
            skipped (how a config drops a dataset it inherited).
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
                if "loss" in entry:
                    raise _entry_loss_error(str(name), entry["loss"])
                unknown = set(entry) - set(_ENTRY_KEYS)
                if unknown:
                    raise DataError(f"mixture dataset {name!r}: unknown keys {sorted(unknown)} (known: {', '.join(_ENTRY_KEYS)})")
                entry = MixtureSource(**entry)
            self.datasets[str(name)] = entry
        if not self.datasets:
            raise DataError("a mixture needs at least one dataset (data.train.datasets)")
        self.temperature = check_temperature(temperature)
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
