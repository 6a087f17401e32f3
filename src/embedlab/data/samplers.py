"""Training batch samplers that plan *global* batches: the same plan on every rank, each rank takes its slice.

Every sampler here decides, for an epoch, the list of global batches (indices into the training dataset) from
the seed and the epoch alone, so every DDP rank computes the identical plan without communicating; rank ``r``
of ``W`` then yields the ``r``-th contiguous slice of each global batch. A global batch holds
``batch_size x W`` examples (``batch_size`` is per device, as ``data.batch_size`` is with Lightning's
DistributedSampler), and its length is always a multiple of ``W``, so every rank gets the same number of
batches of the same size -- collectives inside the loss (cross-device negatives) never wait on a rank that
ran out.

- :class:`ShuffleBatchSampler`: one shuffled pass over the data per epoch (the default training order).
- :class:`NoDuplicatesBatchSampler`: one pass over the data per epoch; an example whose query or document
  id is already in the global batch is deferred to the next batch (``data.no_duplicates=true``).
- :class:`MixtureBatchSampler`: several datasets; each step draws ONE dataset (all ranks draw the same one)
  and a batch from it (``data=mixture``).

Lightning and DDP (checked against Lightning 2.6's ``_dataloader_init_kwargs_resolve_sampler``): Lightning
does *not* leave custom batch samplers alone. With ``use_distributed_sampler=True`` (the default) it rebuilds a
``BatchSampler`` subclass created in ``train_dataloader`` with ``sampler=DistributedSampler(...)`` and calls
``set_epoch`` on ``dataloader.batch_sampler.sampler`` every epoch. These samplers accept that: a
``DistributedSampler`` passed as ``sampler`` only tells them the rank, the world size and the epoch (its own
order is ignored). With ``use_distributed_sampler=False`` they read the rank and world size from
``torch.distributed`` and the epoch from their own :class:`EpochCounter`. Either way the result is the same.

Resuming mid-epoch: because an epoch's plan is a function of (seed, epoch) alone, the position in the data
is two integers, :class:`TrainPosition` ``(epoch, batch)``. A sampler built with ``start=TrainPosition(e, k)``
plans epoch ``e`` (even before Lightning's first ``set_epoch``) and skips its first ``k`` batches, so the run
continues with batch ``k`` exactly as the uninterrupted run would have. ``len()`` counts the whole epoch,
skipped batches included: Lightning resumes its batch index at ``k`` (see ``__len__`` for which epoch it
measures). Later epochs are not skipped. Who records the position and hands it over on resume:
:mod:`embedlab.lightning.resume`.
"""

from __future__ import annotations

from collections import deque
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from embedlab.data.errors import DataError
from embedlab.data.mixture import check_temperature
from embedlab.data.records import Example, example_ids


class TrainPosition(NamedTuple):
    """Where training stands: ``batch`` batches of epoch ``epoch`` are trained on (0-based epoch).

    The end of an epoch is written as the start of the next one, ``(epoch + 1, 0)``.
    """

    epoch: int
    batch: int


class EpochCounter(Sampler[int]):
    """The object Lightning calls ``set_epoch`` on (``dataloader.batch_sampler.sampler``); iterates ``range(n)``."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.n))

    def __len__(self) -> int:
        return self.n


def replica_info(sampler: object = None) -> tuple[int, int]:
    """``(rank, world_size)``: from a DistributedSampler Lightning injected, else torch.distributed, else (0, 1)."""
    if isinstance(sampler, DistributedSampler):
        return int(sampler.rank), int(sampler.num_replicas)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_slice(batch: Sequence[int], rank: int, world: int) -> list[int]:
    """Rank ``rank``'s contiguous share of a global batch whose length is a multiple of ``world``."""
    per = len(batch) // world
    return list(batch[rank * per : (rank + 1) * per])


class DuplicateKeys:
    """Per example: interned ids of its query and positive (``anchors``) and of its hard negatives.

    Two examples clash when an anchor id of one is any id of the other (the same query twice, the same
    document as two positives, or one example's positive being another's hard negative). Two examples
    sharing only a hard negative do not clash. Ids are the data's ids (``query_id``, ``positive_id``,
    ``negative_ids``) or, without one, the text hash that collate uses; query ids and document ids live in
    separate namespaces (BEIR query "1" is not document "1").
    """

    def __init__(self, examples: Sequence[Example]) -> None:
        table: dict[tuple[str, str], int] = {}

        def code(space: str, value: str) -> int:
            return table.setdefault((space, value), len(table))

        self.anchors: list[tuple[int, ...]] = []
        self.negatives: list[tuple[int, ...]] = []
        for e in examples:
            ids = example_ids(e)
            self.anchors.append((code("q", ids.query), code("d", ids.positive)))
            self.negatives.append(tuple(code("d", n) for n in ids.negatives))
        self.has_negatives = any(self.negatives)

    def __len__(self) -> int:
        return len(self.anchors)


class _BatchState:
    """The ids of the batch being filled; ``fits`` / ``add`` in O(ids of one example)."""

    __slots__ = ("keys", "offset", "taken", "anchor_ids", "all_ids", "items")

    def __init__(self, keys: DuplicateKeys | None, offset: int = 0) -> None:
        self.keys, self.offset = keys, offset
        self.taken: set[int] = set()
        self.anchor_ids: set[int] = set()
        self.all_ids: set[int] = set()
        self.items: list[int] = []

    def fits(self, i: int) -> bool:
        if i in self.taken:
            return False
        if self.keys is None:
            return True
        j = i - self.offset
        all_ids = self.all_ids
        for k in self.keys.anchors[j]:
            if k in all_ids:
                return False
        anchor_ids = self.anchor_ids
        for k in self.keys.negatives[j]:
            if k in anchor_ids:
                return False
        return True

    def add(self, i: int) -> None:
        self.items.append(i)
        self.taken.add(i)
        if self.keys is not None:
            j = i - self.offset
            anchors = self.keys.anchors[j]
            self.anchor_ids.update(anchors)
            self.all_ids.update(anchors)
            self.all_ids.update(self.keys.negatives[j])


def planned_loader(dataset: Dataset, batch_sampler: "_GlobalBatchSampler", collate_fn, num_workers: int = 0) -> DataLoader:
    """The training DataLoader over one of these samplers.

    It gets a private torch generator (seeded like the sampler): creating a DataLoader iterator draws the
    workers' base seed from the loader's generator, by default the global one, so without it the global
    stream (dropout masks) would depend on when Lightning creates the epoch's iterator, and a resumed run
    (which creates it before restoring the RNG states) would drift from the uninterrupted one.
    """
    generator = torch.Generator().manual_seed(batch_sampler.seed)
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers, collate_fn=collate_fn, generator=generator)


def _trim(batch: list[int], world: int) -> list[int]:
    return batch[: len(batch) - len(batch) % world]


class _GlobalBatchSampler(BatchSampler):
    """Base: ``plan(epoch, world)`` -> the epoch's global batches; ``__iter__`` yields this rank's slices.

    ``sampler``: ``None`` (an :class:`EpochCounter` is made), or whatever Lightning injects (a
    ``DistributedSampler``: rank, world size and epoch are read from it). ``start``: the
    :class:`TrainPosition` a resumed run continues from (see the module docstring), or ``None``.
    """

    def __init__(
        self, sampler: Sampler | None, n: int, batch_size: int, drop_last: bool, seed: int, start: TrainPosition | None = None
    ) -> None:
        # BatchSampler.__init__ is not called: there is no per-index sampler to batch
        self.sampler = sampler if sampler is not None else EpochCounter(n)
        self.n = n
        self.batch_size = int(batch_size)
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        self.start = None if start is None else TrainPosition(int(start[0]), int(start[1]))
        if self.start is not None and (self.start.epoch < 0 or self.start.batch < 0):
            raise ValueError(f"start must be a non-negative (epoch, batch), got {tuple(start)}")
        self._epoch: int | None = None
        self._cache: tuple[tuple[int, int], list[list[int]]] | None = None

    @property
    def epoch(self) -> int:
        """The epoch being iterated: the one last set, or a resumed run's until a later one is set."""
        # a resumed run iterates before Lightning's first set_epoch (the sampler still says 0): epochs only go forward
        return max(self._set_epoch, self.start.epoch) if self.start is not None else self._set_epoch

    @property
    def _set_epoch(self) -> int:
        return self._epoch if self._epoch is not None else int(getattr(self.sampler, "epoch", 0))

    def set_epoch(self, epoch: int) -> None:
        """For use without Lightning (Lightning calls ``set_epoch`` on ``.sampler``)."""
        self._epoch = int(epoch)

    def rng(self, epoch: int) -> np.random.Generator:
        """The epoch's generator: a function of (seed, epoch) only, so identical on every rank."""
        return np.random.default_rng([self.seed, epoch])

    def plan(self, epoch: int, world: int) -> list[list[int]]:
        raise NotImplementedError

    def global_batches(self, world: int | None = None, epoch: int | None = None) -> list[list[int]]:
        """The global batches of ``epoch`` (default: this epoch), cached per epoch and world size."""
        if world is None:
            world = replica_info(self.sampler)[1]
        key = (self.epoch if epoch is None else epoch, world)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.plan(*key))
        return self._cache[1]

    def __iter__(self) -> Iterator[list[int]]:
        rank, world = replica_info(self.sampler)
        batches = self.global_batches(world)
        # resuming inside this epoch: its first start.batch batches were trained on before the checkpoint
        skip = self.start.batch if self.start is not None and self.start.epoch == self.epoch else 0
        for batch in batches[skip:]:
            yield local_slice(batch, rank, world)

    def __len__(self) -> int:
        """Batches of the epoch last set, including those a resumed run skips (Lightning counts them as done).

        Lightning reads it once, before its first ``set_epoch``, as ``num_training_batches`` (the LR schedule's
        length, the cut-off of longer epochs): an uninterrupted run measures epoch 0 there, so a resumed run must
        too, even though it iterates the start epoch (the epochs of a no-duplicates plan differ in length).
        """
        return len(self.global_batches(epoch=self._set_epoch))


class ShuffleBatchSampler(_GlobalBatchSampler):
    """Plain batches: one pass per epoch in a (seed, epoch)-shuffled order, cut into global batches.

    What ``DataLoader(shuffle=True)`` does, with the order a function of (seed, epoch) instead of the global
    torch random state, so a resumed run knows it. The last global batch may be short (dropped with
    ``drop_last``); under DDP it is cut to a multiple of the world size (at most ``W - 1`` examples dropped).

    Args:
        sampler: ``None`` or Lightning's injected DistributedSampler (see the module docstring).
        n: examples in the dataset.
        batch_size: per device; a global batch holds ``batch_size x world_size`` examples.
        shuffle: ``False``: dataset order every epoch.
        start: the position a resumed run continues from.
    """

    def __init__(
        self,
        sampler: Sampler | None = None,
        *,
        n: int,
        batch_size: int,
        drop_last: bool = False,
        shuffle: bool = True,
        seed: int = 0,
        start: TrainPosition | None = None,
    ) -> None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        super().__init__(sampler, int(n), batch_size, drop_last, seed, start)
        self.shuffle = shuffle

    def order(self, epoch: int) -> list[int]:
        """The epoch's order of the examples: a (seed, epoch) permutation, or the dataset order."""
        return self.rng(epoch).permutation(self.n).tolist() if self.shuffle else list(range(self.n))

    def plan(self, epoch: int, world: int) -> list[list[int]]:
        order, size = self.order(epoch), self.batch_size * world
        batches = [_trim(order[i : i + size], world) for i in range(0, self.n, size)]
        return [b for b in batches if b and not (self.drop_last and len(b) < size)]


class NoDuplicatesBatchSampler(ShuffleBatchSampler):
    """Batches without a duplicate query or document (see :class:`DuplicateKeys`), one pass per epoch.

    Examples are taken in (shuffled) order; one that clashes with the batch being filled is deferred and
    tried first in the next batch. Cost: O(N) per epoch plus one re-check per deferral (SciFact-like data:
    a few percent of examples). Every example appears exactly once per epoch, except:

    - ``drop_last``: batches shorter than the global batch are dropped (normally only the last one or, when
      the final examples clash with each other, the last few);
    - under DDP each global batch is cut to a multiple of the world size (at most ``W - 1`` examples of a
      short final batch are dropped).

    Args:
        sampler: ``None`` or Lightning's injected DistributedSampler (see the module docstring).
        keys: :class:`DuplicateKeys` of the dataset (or the examples themselves).
        batch_size: per device; a global batch holds ``batch_size x world_size`` examples.
        start: the position a resumed run continues from.
    """

    def __init__(self, sampler: Sampler | None = None, *, keys: DuplicateKeys | Sequence[Example], **order) -> None:
        keys = keys if isinstance(keys, DuplicateKeys) else DuplicateKeys(keys)
        super().__init__(sampler, n=len(keys), **order)
        self.keys = keys

    def plan(self, epoch: int, world: int) -> list[list[int]]:
        return pack_without_duplicates(self.order(epoch), self.keys, self.batch_size * world, world, self.drop_last)


def pack_without_duplicates(
    order: Sequence[int], keys: DuplicateKeys, size: int, multiple_of: int = 1, drop_last: bool = False
) -> list[list[int]]:
    """Greedy packing of ``order`` into batches of ``size`` with no clash; deferred examples go first next."""
    queue = deque(order)
    batches: list[list[int]] = []
    while queue:
        state = _BatchState(keys)
        deferred = []
        while queue and len(state.items) < size:
            i = queue.popleft()
            if state.fits(i):
                state.add(i)
            else:
                deferred.append(i)
        queue.extendleft(reversed(deferred))
        batch = _trim(state.items, multiple_of)
        if batch and not (drop_last and len(batch) < size):
            batches.append(batch)
    return batches


class _Stream:
    """Endless batches of one dataset of a mixture: shuffled passes, chained.

    A batch never holds an index twice (nor, with keys, a clashing id); an index that would repeat -- at
    the seam of two passes -- or clash is deferred to the front of the queue for the next batch.
    """

    def __init__(self, offset: int, n: int, size: int, rng: np.random.Generator, shuffle: bool, keys: DuplicateKeys | None) -> None:
        self.offset, self.n, self.size, self.rng, self.shuffle, self.keys = offset, n, size, rng, shuffle, keys
        self.queue: deque[int] = deque()

    def _refill(self) -> None:
        order = self.rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        self.queue.extend((order + self.offset).tolist())

    def next(self, world: int) -> list[int]:
        state = _BatchState(self.keys, self.offset)
        deferred: list[int] = []
        refilled = False
        while len(state.items) < self.size:
            if not self.queue:
                if refilled:  # a whole fresh pass could not fill the batch (ids clash): take what fits
                    break
                self._refill()
                refilled = True
            i = self.queue.popleft()
            if state.fits(i):
                state.add(i)
            else:
                deferred.append(i)
        self.queue.extendleft(reversed(deferred))
        return _trim(state.items, world)


class MixtureBatchSampler(_GlobalBatchSampler):
    """Each step: draw ONE dataset, then a global batch from it; the same draws on every rank.

    Draws are i.i.d. with probability ``p_d ∝ w_d ** (1 / temperature)``, where ``w_d`` is the dataset's
    ``weight`` or, when that is ``None``, its number of global batches per pass (``ceil(N_d / G_d)``):
    at temperature 1 with no weights every dataset is seen about once per epoch (size-proportional);
    temperature > 1 flattens towards uniform (up-samples small datasets), < 1 sharpens. Each dataset's
    batches come from its own stream of shuffled passes (a dataset drawn more often than its size allows
    starts a new pass; one drawn less is only partly seen that epoch). The random generator is seeded with
    ``(seed, epoch)``, so every rank makes the same draws and the same batches.

    Args:
        sampler: ``None`` or Lightning's injected DistributedSampler (see the module docstring).
        sizes: examples per dataset; indices are into their concatenation, in this order.
        batch_sizes: per-device batch size per dataset; the global batch is ``batch_size x world``, capped
            at the dataset's size (rounded down to a multiple of the world size).
        weights: per dataset, a weight or ``None`` (see above).
        steps_per_epoch: global steps per epoch; ``None``: the sum of the datasets' batches per pass.
        keys: per dataset :class:`DuplicateKeys` (or ``None``) to keep duplicate ids out of a batch.
        start: the position a resumed run continues from.
    """

    def __init__(
        self,
        sampler: Sampler | None = None,
        *,
        sizes: Sequence[int],
        batch_sizes: Sequence[int],
        weights: Sequence[float | None] | None = None,
        temperature: float = 1.0,
        steps_per_epoch: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        keys: Sequence[DuplicateKeys | None] | None = None,
        names: Sequence[str] | None = None,
        start: TrainPosition | None = None,
    ) -> None:
        self.sizes = [int(s) for s in sizes]
        self.batch_sizes = [int(b) for b in batch_sizes]
        self.names = list(names) if names is not None else [str(i) for i in range(len(self.sizes))]
        if not self.sizes or len(self.batch_sizes) != len(self.sizes):
            raise ValueError("sizes and batch_sizes need one entry per dataset")
        for name, n, b in zip(self.names, self.sizes, self.batch_sizes):
            if n < 1:
                raise DataError(f"mixture dataset {name!r} has no training examples")
            if b < 1:
                raise DataError(f"mixture dataset {name!r}: batch_size must be >= 1, got {b}")
        self.weights = list(weights) if weights is not None else [None] * len(self.sizes)
        for name, w in zip(self.names, self.weights):
            if w is not None and not float(w) > 0:
                raise DataError(f"mixture dataset {name!r}: weight must be > 0 (or null), got {w}")
        self.temperature = check_temperature(temperature)
        self.steps_per_epoch = None if steps_per_epoch is None else int(steps_per_epoch)
        self.shuffle = shuffle
        self.keys = list(keys) if keys is not None else [None] * len(self.sizes)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(int).tolist()
        super().__init__(sampler, sum(self.sizes), max(self.batch_sizes), False, seed, start)

    def global_sizes(self, world: int) -> list[int]:
        """Per dataset: examples per global batch (per-device batch x world, capped by the dataset size)."""
        out = []
        for name, n, b in zip(self.names, self.sizes, self.batch_sizes):
            g = min(b * world, n - n % world)
            if g < 1:
                raise DataError(f"mixture dataset {name!r} has {n} examples: fewer than the {world} devices")
            out.append(g)
        return out

    def probabilities(self, world: int = 1) -> np.ndarray:
        """The per-step probability of drawing each dataset."""
        passes = [-(-n // g) for n, g in zip(self.sizes, self.global_sizes(world))]
        w = np.array([float(passes[i] if wt is None else wt) for i, wt in enumerate(self.weights)])
        p = w ** (1.0 / self.temperature)
        return p / p.sum()

    def num_steps(self, world: int = 1) -> int:
        if self.steps_per_epoch is not None:
            return self.steps_per_epoch
        return sum(-(-n // g) for n, g in zip(self.sizes, self.global_sizes(world)))

    def plan(self, epoch: int, world: int) -> list[list[int]]:
        rng = self.rng(epoch)
        draws = rng.choice(len(self.sizes), size=self.num_steps(world), p=self.probabilities(world))
        streams = [
            _Stream(off, n, g, np.random.default_rng([self.seed, epoch, d + 1]), self.shuffle, k)
            for d, (off, n, g, k) in enumerate(zip(self.offsets, self.sizes, self.global_sizes(world), self.keys))
        ]
        batches = []
        for d in draws.tolist():
            batch = streams[d].next(world)
            if not batch:
                raise DataError(
                    f"mixture dataset {self.names[d]!r}: cannot form a batch of {world} examples without duplicate ids"
                )
            batches.append(batch)
        return batches

    def dataset_of(self, index: int) -> int:
        """The dataset (position) a concatenated index belongs to."""
        return int(np.searchsorted(self.offsets, index, side="right") - 1)
