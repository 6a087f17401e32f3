"""The ``hydra/sweeper=embedlab_optuna`` config node, registered in Hydra's ConfigStore at plugin scan time.

``configs/hparams_search/optuna.yaml`` selects it (``override /hydra/sweeper: embedlab_optuna``) and fills
``params``; every field can be overridden on the command line as ``hydra.sweeper.<field>=...``.
"""

# no `from __future__ import annotations`: Hydra's plugin scan runs this module before putting it in sys.modules,
# where dataclasses looks up string annotations
from dataclasses import dataclass
from typing import Dict, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class EmbedlabOptunaSweeperConf:
    """Fields of :class:`hydra_plugins.embedlab_optuna.sweeper.EmbedlabOptunaSweeper` (see its docstring)."""

    _target_: str = "hydra_plugins.embedlab_optuna.sweeper.EmbedlabOptunaSweeper"
    # max / min (the checkpoint's monitor_mode) or maximize / minimize
    direction: str = "${monitor_mode}"
    # the study's trials in total, failed ones included; a re-launch on the same storage runs only the missing ones
    n_trials: int = 20
    # trials asked and launched together (a parallel launcher runs them at the same time)
    n_jobs: int = 1
    # an SQLAlchemy URL; null: in memory (no resume)
    storage: Optional[str] = "sqlite:///${hydra.sweep.dir}/optuna.db"
    # null: the sweep dir's name
    study_name: Optional[str] = None
    # TPE sampler: its seed, and how many first trials are drawn at random before TPE models the results
    seed: Optional[int] = "${seed}"  # type: ignore[assignment]
    n_startup_trials: int = 10
    # config key -> search space in Hydra's override grammar (choice, range, interval, tag(log, interval))
    params: Optional[Dict[str, str]] = None


ConfigStore.instance().store(group="hydra/sweeper", name="embedlab_optuna", node=EmbedlabOptunaSweeperConf, provider="embedlab")
