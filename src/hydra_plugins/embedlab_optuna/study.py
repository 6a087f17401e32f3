"""Read an Optuna search back from its sweep dir: ``load_sweep_study(sweep_dir)`` (report.py, notebooks).

The sweeper writes the study's storage URL (an absolute SQLite path by default) and name into
``<sweep dir>/multirun.yaml`` (``hydra.sweeper.storage``, ``hydra.sweeper.study_name``). Each trial ``n`` ran as
the job ``<sweep dir>/n`` with the overrides in its user attribute ``overrides``; a failed trial says why in
``failure`` (and has ``interrupted: true`` when the search was stopped under it).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import OmegaConf

from embedlab.errors import ConfigError

if TYPE_CHECKING:
    import optuna

SWEEPER_TARGET = "hydra_plugins.embedlab_optuna.sweeper.EmbedlabOptunaSweeper"


def sweep_study_location(sweep_dir: str | Path) -> tuple[str, str]:
    """``(storage URL, study name)`` of the search run in ``sweep_dir``.

    A sweep dir moved since the search (the absolute SQLite path in ``multirun.yaml`` gone) is still read from
    the database file of the same name inside it.
    """
    sweep_dir = Path(sweep_dir)
    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        raise ConfigError(f"{path}: no such file (not a Hydra multirun folder)")
    sweeper = OmegaConf.load(path).hydra.sweeper
    if sweeper.get("_target_") != SWEEPER_TARGET:
        raise ConfigError(f"{path}: not an Optuna search (hydra.sweeper._target_ is {sweeper.get('_target_')!r})")
    storage = sweeper.storage
    if storage is None:
        raise ConfigError(f"{path}: the search kept its study in memory (hydra.sweeper.storage=null): nothing to read")
    prefix = "sqlite:///"
    if storage.startswith(prefix):
        file = Path(storage[len(prefix) :].partition("?")[0])
        if not file.exists() and (sweep_dir / file.name).is_file():
            storage = f"{prefix}{(sweep_dir / file.name).resolve()}"
    return storage, sweeper.study_name


def load_sweep_study(sweep_dir: str | Path) -> optuna.Study:
    """The Optuna study of the search run in ``sweep_dir`` (see :func:`sweep_study_location`)."""
    import optuna

    storage, name = sweep_study_location(sweep_dir)
    return optuna.load_study(study_name=name, storage=storage)
