"""The Sweeper class Hydra instantiates for ``hydra/sweeper=embedlab_optuna``; the search is in ``_search``."""

from __future__ import annotations

from typing import Any

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class EmbedlabOptunaSweeper(Sweeper):
    """A TPE search (Optuna) over ``params``, one Hydra job per trial, resumable from its storage.

    Every trial is asked from the study, run as the Hydra job ``<sweep dir>/<trial number>`` (the launcher's job
    number is the trial number) with the fixed command-line overrides plus the trial's values, and told the
    value the job returns (train.py: the best validation value of ``optimized_metric``). A job that raises or
    returns no finite number is told FAIL and the search goes on. Trials still RUNNING in the storage when a
    search starts were left by a killed search: they are told FAIL and do not count towards ``n_trials``.

    Args (the fields of ``hydra.sweeper``, see :class:`~hydra_plugins.embedlab_optuna.config.EmbedlabOptunaSweeperConf`):
        direction: ``max`` / ``maximize`` or ``min`` / ``minimize``.
        n_trials: trials the study should hold when the search ends (interrupted ones not counted).
        n_jobs: trials asked and launched as one batch.
        storage: SQLAlchemy URL (``sqlite:///<path>``; a relative path is taken from the working directory),
            ``None`` for an in-memory study.
        study_name: ``None``: the sweep dir's name.
        seed: the TPE sampler's seed (plus the number of trials already in the study, so a resumed search does
            not replay the first one's random start-up draws).
        n_startup_trials: TPE's random first trials.
        params: config key -> search space (``choice(16,32)``, ``range(1,5)``, ``interval(0,1)``,
            ``tag(log, interval(1e-5,1e-4))``, ``int(interval(1,8))``) or a fixed value.
    """

    def __init__(
        self,
        direction: str,
        n_trials: int,
        n_jobs: int,
        storage: str | None,
        study_name: str | None,
        seed: int | None,
        n_startup_trials: int,
        params: dict[str, str] | None = None,
    ) -> None:
        self.direction = direction
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.storage = storage
        self.study_name = study_name
        self.seed = seed
        self.n_startup_trials = n_startup_trials
        self.params = dict(params or {})
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        """Run the search; ``arguments`` are the command line's task overrides. Returns the Optuna study."""
        from hydra_plugins.embedlab_optuna._search import run_search

        assert self.config is not None and self.launcher is not None, "setup() first"
        return run_search(self, arguments)
