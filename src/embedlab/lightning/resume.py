"""Exact resume: a run killed mid-epoch and resumed from ``last.ckpt`` ends with the uninterrupted run's weights.

Lightning's checkpoint restores the weights, the optimizer and LR-scheduler states and the loop counters
(epoch, batch index, global step). Two things a bit-exact continuation also needs are not in it:

- **Where the data stands.** Lightning restarts a mid-epoch resume at the epoch's first batch unless the
  loader is "stateful", and even a stateful loader's state is dropped when ``configure_optimizers`` reads
  ``trainer.estimated_stepping_batches`` (the LR schedule does: that builds and iterates the loader before the
  loops are restored). embedlab's batch samplers plan each epoch from (seed, epoch) alone
  (:mod:`embedlab.data.samplers`), so the position is two integers, a
  :class:`~embedlab.data.samplers.TrainPosition` ``(epoch, batch)``: :class:`ResumeState` writes it into every
  checkpoint and, on resume, sets it as the DataModule's ``train_start``, whose training sampler then plans
  that epoch and skips the batches already trained on.
- **The random number generators.** Dropout masks (embedlab's CPU dropout and PyTorch's) come from torch's
  global generator; numpy's and Python's global generators are saved too for any code that draws from them.
  :class:`ResumeState` saves them with every checkpoint and sets them back at ``on_train_start``, the last
  hook before the first resumed batch: everything Lightning does while restoring (building and iterating the
  loader, the optimizer, the scheduler) happens before it, so none of it shifts the streams. Under DDP each
  rank's states are gathered into the checkpoint and every rank gets its own back.

Everything else an exact resume depends on is already a function of the checkpoint: the LR schedule is the
scheduler's state, GradCache replays its RNG inside a step, hard negatives are fixed fields of the examples,
a mixture's dataset draws are part of its (seed, epoch) plan.

Checkpoint entry: ``checkpoint["embedlab_resume"] = {"position": {"epoch", "batch"}, "rng": [per rank]}``,
plain Python values and tensors only, so :func:`embedlab.models.checkpoint.safe_load` reads it.
Configured in ``configs/callbacks/default.yaml`` (``resume_state``).
"""

from __future__ import annotations

import logging
import random
import warnings
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from embedlab.data.datamodule import EmbeddingDataModule
from embedlab.data.samplers import TrainPosition

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "embedlab_resume"


def capture_rng_states() -> dict[str, Any]:
    """This process's global generators (torch CPU, torch CUDA when in use, numpy, Python) as plain values."""
    name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    states = {
        "torch": torch.get_rng_state(),
        # numpy's key is a uint32 array: stored as ints so the restricted unpickler needs no numpy class
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["torch_cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Set the global generators to what :func:`capture_rng_states` returned."""
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    cuda = states.get("torch_cuda")
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning("resume: the checkpoint has CUDA RNG states of %d devices, this machine %d: not restored", len(cuda), torch.cuda.device_count())


def training_position(trainer: L.Trainer) -> TrainPosition:
    """The data position at this moment of a fit: the current epoch and its batches trained on so far.

    The count is Lightning's ``processed`` batches of the epoch, the batch index Lightning itself resumes at:
    a checkpoint written at ``on_train_batch_end`` or after validation counts the batch just trained, one
    written in the middle of a step (a signal handler's) does not, and the resume repeats that batch. A
    finished epoch (its last batch trained, or Lightning's ``num_training_batches`` reached) is written as the
    start of the next, the epoch Lightning resumes in; so is a checkpoint written between epochs or after the
    fit (``on_train_epoch_end``, ``on_train_end``), where the batch counts still describe the epoch just done.
    """
    epochs = trainer.fit_loop.epoch_progress.current
    if epochs.processed >= epochs.started:  # no epoch in progress: ``processed`` epochs are done
        return TrainPosition(int(epochs.processed), 0)
    epoch = int(epochs.processed)  # the epoch in progress (== trainer.current_epoch)
    batches = trainer.fit_loop.epoch_loop.batch_progress
    done = int(batches.current.processed)
    if done >= trainer.num_training_batches or (batches.is_last_batch and done == batches.current.ready):
        return TrainPosition(epoch + 1, 0)
    return TrainPosition(epoch, done)


class ResumeState(L.Callback):
    """Writes the data position and the RNG states into every checkpoint; restores them on ``ckpt_path=``.

    After a resume, :attr:`train_start` is the :class:`~embedlab.data.samplers.TrainPosition` the training
    loader starts from (also set as the DataModule's ``train_start``); ``None`` on a fresh fit.
    """

    def __init__(self) -> None:
        self.train_start: TrainPosition | None = None
        self._pending_rng: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        states = capture_rng_states()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # every rank saves (Lightning calls this hook on all of them); rank 0's file holds all the states
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, states)
        else:
            gathered = [states]
        position = training_position(trainer)
        checkpoint[CHECKPOINT_KEY] = {"position": position._asdict(), "rng": gathered}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None:
            log.warning(
                "resume: checkpoint %s holds no %r entry (data position, RNG states): the epoch restarts at its "
                "first batch and the random streams from the seed", trainer.ckpt_path, CHECKPOINT_KEY
            )
            return
        self.train_start = TrainPosition(**saved["position"])
        if isinstance(trainer.datamodule, EmbeddingDataModule):
            trainer.datamodule.train_start = self.train_start
        ranks = saved["rng"]
        if len(ranks) != trainer.world_size:
            log.warning(
                "resume: the checkpoint was written by %d processes, this run has %d: the global batches differ "
                "(batch_size x processes) and each rank takes the RNG states of rank (rank mod %d), so the run "
                "continues at the same epoch and batch index but does not repeat the original",
                len(ranks), trainer.world_size, len(ranks),
            )
        self._pending_rng = ranks[trainer.global_rank % len(ranks)]
        if self.train_start.batch > 0:
            # Lightning warns that a mid-epoch resume restarts a loader it cannot restore; this one is restored
            warnings.filterwarnings(
                "ignore", message="You're resuming from a checkpoint that ended before the epoch ended", category=PossibleUserWarning
            )
        log.info("resume: epoch %d continues at batch %d", self.train_start.epoch, self.train_start.batch)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending_rng is not None:
            restore_rng_states(self._pending_rng)
            self._pending_rng = None
