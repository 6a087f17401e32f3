"""Pruning: a Lightning callback that stops an Optuna trial's training when its validation falls behind.

(A module name starting with ``_``: Hydra's plugin scan skips it, so Hydra programs start without importing
Lightning; the config instantiates ``hydra_plugins.embedlab_optuna._pruning.OptunaPruning`` by its path.)

``hparams_search=optuna`` adds it as ``callbacks.optuna_pruning``. After every validation of a trial's job it
reports ``monitor`` to the trial (step = the index of that validation in the run: 0, 1, ...; comparable across
trials whatever their batch size, unlike the optimizer step) and asks the pruner; when the pruner says so it
raises ``optuna.TrialPruned``, which ends the job, and the sweeper tells the trial PRUNED.

It finds its trial from Hydra: the job is number ``hydra.job.num`` (= the trial number) of a multirun whose
sweeper is embedlab_optuna, and the study's storage and name are in ``<sweep dir>/multirun.yaml``. Anywhere else
(a single run, a basic-sweeper multirun, a test) it does nothing. Where it fits: runs with several validations
(epochs, ``trainer.val_check_interval``); a run that validates once is never pruned.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

log = logging.getLogger(__name__)


class OptunaPruning(pl.Callback):
    """Report ``monitor`` after each validation to the job's trial; raise ``optuna.TrialPruned`` when pruned.

    Args:
        monitor: the validation metric the search optimizes (``${monitor}``).
        pruner: an ``optuna.pruners.BasePruner`` (e.g. ``MedianPruner(n_startup_trials=5, n_warmup_steps=1)``);
            ``None``: report only, never prune.
        sweep_dir, trial: the search's folder and this job's trial number; ``None``: from Hydra (see the module
            docstring).
    """

    def __init__(self, monitor: str, pruner: Any = None, sweep_dir: str | Path | None = None, trial: int | None = None) -> None:
        self.monitor, self.pruner = monitor, pruner
        self.sweep_dir, self.trial = sweep_dir, trial
        self.validations = 0
        self._target: tuple[Any, Any, int] | None = None  # (study, storage, trial id), set up on first use

    @staticmethod
    def hydra_trial() -> tuple[Path, int] | None:
        """``(sweep dir, trial number)`` of this Hydra job when it is a trial of an embedlab_optuna search."""
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        from hydra_plugins.embedlab_optuna.study import SWEEPER_TARGET

        if not HydraConfig.initialized():
            return None
        hydra = HydraConfig.get()
        if hydra.mode != RunMode.MULTIRUN or hydra.sweeper.get("_target_") != SWEEPER_TARGET:
            return None
        sweep_dir = Path(hydra.sweep.dir)
        if not sweep_dir.is_absolute():  # relative to where the search was launched (hydra.job.chdir may move the job)
            sweep_dir = Path(hydra.runtime.cwd) / sweep_dir
        return sweep_dir, int(hydra.job.num)

    def target(self) -> tuple[Any, Any, int] | None:
        if self._target is None:
            import optuna

            from hydra_plugins.embedlab_optuna.study import sweep_study_location

            given = self.sweep_dir is not None and self.trial is not None
            located = (Path(self.sweep_dir), int(self.trial)) if given else self.hydra_trial()
            if located is None:
                return None
            storage_url, name = sweep_study_location(located[0])
            study = optuna.load_study(study_name=name, storage=storage_url, pruner=self.pruner)
            storage = optuna.storages.get_storage(storage_url)
            trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(name), located[1])
            self._target = (study, storage, trial_id)
        return self._target

    def report(self, step: int, value: Any) -> bool:
        """Report ``value`` at ``step`` to the trial (rank 0); whether the pruner stops it."""
        target = self.target()
        if value is None or target is None or not math.isfinite(float(value)):
            return False
        study, storage, trial_id = target
        storage.set_trial_intermediate_value(trial_id, step, float(value))
        return self.pruner is not None and bool(self.pruner.prune(study, storage.get_trial(trial_id)))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        step = self.validations
        self.validations += 1
        value = trainer.callback_metrics.get(self.monitor)
        prune = self.report(step, value) if trainer.is_global_zero else False
        # every DDP rank stops, or the others would wait for rank 0 forever
        if trainer.strategy.broadcast(prune, src=0):
            import optuna

            message = f"pruned after validation {step}: {self.monitor}={float(value):.4g}"
            log.info(f"trial {message}")
            raise optuna.TrialPruned(message)
