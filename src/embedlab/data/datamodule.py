"""LightningDataModule: training examples and the validation / test tasks, from config-built sources."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader

from embedlab.data.collate import ExampleDataset, collate_examples
from embedlab.data.errors import DataError
from embedlab.data.mixture import Mixture, MixtureCollate, MixtureDataset
from embedlab.data.records import RetrievalTask, STSTask
from embedlab.data.samplers import (
    DuplicateKeys,
    MixtureBatchSampler,
    NoDuplicatesBatchSampler,
    ShuffleBatchSampler,
    TrainPosition,
    planned_loader,
)


class EmbeddingDataModule(L.LightningDataModule):
    """Training pairs/triplets/scored pairs, and the tasks (retrieval or STS) that validate and test on them.

    The data layer yields data only: ``train_examples`` (and ``mixture_examples`` by dataset), ``val_task`` and
    ``test_task``. What to encode and how to score a task is the evaluating module's business, so the
    validation/test loaders come from the LightningModule being fitted (its ``val_dataloader`` /
    ``test_dataloader``, built from these tasks by its evaluator).

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
        root: the data folder the sources' paths are built from (kept for logging).
        name: the dataset's name (kept for logging).
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
        root: str | None = None,
        name: str | None = None,
        no_duplicates: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= float(val_fraction) < 1.0:
            raise DataError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        self.train_source, self.val_source, self.test_source = train, val, test
        self.val_fraction = float(val_fraction)
        self.seed = seed
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.num_workers = num_workers
        self.root = root
        self.name = name
        self.no_duplicates = no_duplicates
        self.train_examples = None
        # mixtures: the examples of each dataset, by name (train_examples is their concatenation)
        self.mixture_examples: dict[str, list] | None = None
        self.val_task: RetrievalTask | STSTask | None = None
        self.test_task: RetrievalTask | STSTask | None = None
        # where a resumed fit's training batches start; set from the checkpoint (embedlab.lightning.resume)
        self.train_start: TrainPosition | None = None

    @property
    def has_validation(self) -> bool:
        """Whether fitting will have a validation task (known before :meth:`setup` reads any file)."""
        return self.val_source is not None or self.val_fraction > 0

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", "validate", None) and self.train_examples is None:
            self._setup_fit()
        if stage in ("test", None) and self.test_task is None:
            self.test_task = self.load_test_task()

    def load_test_task(self) -> RetrievalTask | STSTask:
        """The test source's task; an exact error when the data config has none."""
        if self.test_source is None:
            raise DataError(f"data config {self.name or ''!r} has no test source: set data.test (a BEIR folder, STS file or table)")
        return self.test_source.task()

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
        self.val_task = val_task

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        # Every training order is a batch sampler planned from (seed, epoch) alone (embedlab.data.samplers), built
        # here inside the hook: under DDP with use_distributed_sampler=True Lightning rebuilds it with
        # sampler=DistributedSampler(...), which it reads for rank / world size / epoch only. A resumed fit
        # starts at ``train_start``, its checkpoint's (epoch, batch) position; None on a fresh fit.
        if self.mixture_examples is not None:
            return self._mixture_dataloader(self.train_start)
        order = dict(
            batch_size=self.batch_size, drop_last=self.drop_last, shuffle=self.shuffle, seed=self.seed, start=self.train_start
        )
        if self.no_duplicates:
            sampler = NoDuplicatesBatchSampler(keys=DuplicateKeys(self.train_examples), **order)
        else:
            sampler = ShuffleBatchSampler(n=len(self.train_examples), **order)
        return planned_loader(ExampleDataset(self.train_examples), sampler, collate_examples, self.num_workers)

    def _mixture_dataloader(self, start: TrainPosition | None = None) -> DataLoader:
        mixture: Mixture = self.train_source
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
            start=start,
        )
        collate = MixtureCollate(mixture.names, [e.query_prompt for e in entries], [e.document_prompt for e in entries])
        return planned_loader(MixtureDataset(parts), sampler, collate, self.num_workers)

    # the module that evaluates knows what to encode or score for a task: its evaluator builds these loaders
    def val_dataloader(self):
        return self.trainer.lightning_module.val_dataloader()

    def test_dataloader(self):
        return self.trainer.lightning_module.test_dataloader()
