"""LightningDataModule: training examples plus validation/test evaluators, from config-built sources."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from embedlab.data.collate import EncodeBatches, ExampleDataset, collate_examples, identity_collate
from embedlab.data.errors import DataError
from embedlab.data.mixture import Mixture, MixtureCollate, MixtureDataset
from embedlab.data.samplers import DuplicateKeys, MixtureBatchSampler, NoDuplicatesBatchSampler
from embedlab.evaluation.evaluators import build_evaluator


class EmbeddingDataModule(L.LightningDataModule):
    """Training pairs/triplets/scored pairs and the evaluation tasks that validate and test on them.

    Args:
        train / val / test: sources (``BeirSource``, ``STSSource``, ``TableSource``) or ``None``; ``train``
            may also be a :class:`~embedlab.data.mixture.Mixture` of named sources (one dataset per step).
        val_fraction: when ``val`` is ``None``, hold out this fraction of ``train`` (seeded by ``seed``;
            by query for retrieval data) as the validation task. 0 disables validation. With a mixture,
            the fraction is carved from its ``eval_dataset`` (default: the first).
        batch_size: training batch size per device (the number of queries: in-batch negatives come from
            it); with a mixture, the batch size of datasets that do not set their own.
        no_duplicates: batches never hold the same query or document twice (nor one example's positive as
            another's hard negative): :class:`~embedlab.data.samplers.NoDuplicatesBatchSampler`, or the same
            rule inside each mixture dataset's batches.
        eval: options of the evaluators (``k_values``, ``score_function``, ``batch_size``, ...).
        root: the data folder the sources' paths are built from (kept for logging).
        monitor / monitor_mode: the validation metric (and its direction) that model selection uses.
    """

    def __init__(
        self,
        train=None,
        val=None,
        test=None,
        val_fraction: float = 0.0,
        seed: int = 42,
        batch_size: int = 32,
        shuffle: bool = True,
        drop_last: bool = False,
        num_workers: int = 0,
        eval: dict | None = None,
        root: str | None = None,
        name: str | None = None,
        monitor: str | None = None,
        monitor_mode: str = "max",
        no_duplicates: bool = False,
    ) -> None:
        super().__init__()
        self.train_source, self.val_source, self.test_source = train, val, test
        self.val_fraction = val_fraction
        self.seed = seed
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.num_workers = num_workers
        self.eval_options = dict(eval or {})
        self.root = root
        self.name = name
        self.monitor, self.monitor_mode = monitor, monitor_mode
        self.no_duplicates = no_duplicates
        self.train_examples = None
        # mixtures: the examples of each dataset, by name (train_examples is their concatenation)
        self.mixture_examples: dict[str, list] | None = None
        self.val_evaluator = None
        self.test_evaluator = None

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", "validate", None) and self.train_examples is None:
            self._setup_fit()
        if stage in ("test", None) and self.test_evaluator is None and self.test_source is not None:
            self.test_evaluator = build_evaluator(self.test_source.task(), **self.eval_options)

    def _setup_fit(self) -> None:
        if self.train_source is None:
            raise DataError("data.train is not set: training needs a train source")
        val_task = None
        if isinstance(self.train_source, Mixture):
            self.mixture_examples, val_task = self.train_source.load(
                self.val_fraction, self.seed, carve=self.val_source is None
            )
            self.train_examples = [e for part in self.mixture_examples.values() for e in part]
            if self.val_source is not None:
                val_task = self.val_source.task()
        elif self.val_source is not None:
            self.train_examples = self.train_source.examples()
            val_task = self.val_source.task()
        elif self.val_fraction > 0:
            self.train_examples, val_task = self.train_source.carve(self.val_fraction, self.seed)
        else:
            self.train_examples = self.train_source.examples()
        if not self.train_examples:
            raise DataError("the training split has no examples")
        if val_task is not None:
            self.val_evaluator = build_evaluator(val_task, **self.eval_options)

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        # The custom batch samplers are BatchSampler subclasses built here, inside the hook: under DDP with
        # use_distributed_sampler=True Lightning rebuilds them with sampler=DistributedSampler(...), which
        # they read for rank / world size / epoch only (embedlab.data.samplers); both settings work.
        if self.mixture_examples is not None:
            return self._mixture_dataloader()
        if self.no_duplicates:
            sampler = NoDuplicatesBatchSampler(
                keys=DuplicateKeys(self.train_examples),
                batch_size=self.batch_size,
                drop_last=self.drop_last,
                shuffle=self.shuffle,
                seed=self.seed,
            )
            return DataLoader(
                ExampleDataset(self.train_examples),
                batch_sampler=sampler,
                num_workers=self.num_workers,
                collate_fn=collate_examples,
            )
        return DataLoader(
            ExampleDataset(self.train_examples),
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            drop_last=self.drop_last,
            num_workers=self.num_workers,
            collate_fn=collate_examples,
        )

    def _mixture_dataloader(self) -> DataLoader:
        mixture: Mixture = self.train_source
        self._check_mixture_losses(mixture)
        entries = [mixture.datasets[name] for name in mixture.names]
        parts = [self.mixture_examples[name] for name in mixture.names]
        sampler = MixtureBatchSampler(
            sizes=[len(p) for p in parts],
            batch_sizes=[e.batch_size or self.batch_size for e in entries],
            weights=[e.weight for e in entries],
            temperature=mixture.temperature,
            steps_per_epoch=mixture.steps_per_epoch,
            shuffle=self.shuffle,
            seed=self.seed,
            keys=[DuplicateKeys(p) for p in parts] if self.no_duplicates else None,
            names=mixture.names,
        )
        collate = MixtureCollate(mixture.names, [e.query_prompt for e in entries], [e.document_prompt for e in entries])
        return DataLoader(MixtureDataset(parts), batch_sampler=sampler, num_workers=self.num_workers, collate_fn=collate)

    def _check_mixture_losses(self, mixture: Mixture) -> None:
        """Per-dataset losses need ``loss=by_dataset``: refuse to train a mixture that would silently ignore them."""
        named = {name: e.loss for name, e in mixture.datasets.items() if e.loss is not None}
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        loss = getattr(module, "loss", None)
        if not named or not isinstance(loss, torch.nn.Module):
            return
        from embedlab.losses.routing import LossByDataset

        if not any(isinstance(m, LossByDataset) for m in loss.modules()):
            raise DataError(
                f"mixture datasets {sorted(named)} set their own loss, but the loss is {type(loss).__name__}: "
                "use loss=by_dataset (or set their `loss` to null)"
            )

    def val_dataloader(self):
        return self._encode_loader(self.val_evaluator)

    def test_dataloader(self):
        return self._encode_loader(self.test_evaluator)

    def _encode_loader(self, evaluator) -> DataLoader | list:
        if evaluator is None:
            return []
        batches = EncodeBatches(evaluator.encode_plan(), self.eval_options.get("batch_size", 64))
        return DataLoader(batches, batch_size=None, shuffle=False, collate_fn=identity_collate, num_workers=0)
