"""LightningDataModule: training examples plus validation/test evaluators, from config-built sources."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader

from embedlab.data.collate import EncodeBatches, ExampleDataset, collate_examples, identity_collate
from embedlab.data.errors import DataError
from embedlab.evaluation.evaluators import build_evaluator


class EmbeddingDataModule(L.LightningDataModule):
    """Training pairs/triplets/scored pairs and the evaluation tasks that validate and test on them.

    Args:
        train / val / test: sources (``BeirSource``, ``STSSource``, ``TableSource``) or ``None``.
        val_fraction: when ``val`` is ``None``, hold out this fraction of ``train`` (seeded by ``seed``;
            by query for retrieval data) as the validation task. 0 disables validation.
        batch_size: training batch size (the number of queries: in-batch negatives come from it).
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
        self.train_examples = None
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
        if self.val_source is not None:
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
        return DataLoader(
            ExampleDataset(self.train_examples),
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            drop_last=self.drop_last,
            num_workers=self.num_workers,
            collate_fn=collate_examples,
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
