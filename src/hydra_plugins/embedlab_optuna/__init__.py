"""embedlab's Optuna sweeper for Hydra: ``python train.py -m hparams_search=optuna`` (docs/sweeps.md#optuna).

A Hydra plugin has to live in the ``hydra_plugins`` namespace package: Hydra imports every module under it at
start-up (``hydra.core.plugins.Plugins`` walks the package, skipping modules whose name starts with ``_``),
registers the concrete ``Sweeper`` classes it finds, and refuses to instantiate a plugin ``_target_`` outside it.
So the pieces are split by what that scan may import:

- ``config``: the ``hydra/sweeper=embedlab_optuna`` config node (a dataclass in Hydra's ConfigStore);
- ``sweeper``: the ``Sweeper`` class Hydra instantiates; it imports Optuna only when a sweep starts, so that
  every other Hydra program (``train.py --help``, ``evaluate.py``) starts without it;
- ``_search``: the search itself (search space from Hydra's override grammar, the ask / launch / tell loop, the
  resume bookkeeping, the results file); not scanned;
- ``study``: reading a finished or running search back (``load_sweep_study``), for reports;
- ``_pruning``: the Lightning callback that reports validations to the trial and prunes it (``hparams_search=optuna``
  adds it as ``callbacks.optuna_pruning``); not scanned, so Hydra programs start without importing Lightning.

Why not hydra-optuna-sweeper: its newest release pins optuna < 3, which does not run on SQLAlchemy 2; by default it
stops at the first failed job; and its study is in memory with a random name unless told otherwise, so a search
cannot resume.
"""
