"""What every entry point's run shares (train, evaluate): objects of a config group mapping (loggers,
callbacks), ``metrics.json``, closing loggers. Free of Lightning, so ``evaluate.py`` starts without importing it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from embedlab.atomic import atomic_write_text


def instantiate_list(cfg: DictConfig | None) -> list:
    """Instantiate every ``_target_`` entry of a config group mapping (callbacks, loggers)."""
    if not cfg:
        return []
    return [instantiate(c) for c in cfg.values() if isinstance(c, DictConfig) and "_target_" in c]


def write_metrics(metrics: dict[str, Any], output_dir: str | Path) -> Path:
    """Write a flat ``metrics.json`` (floats only) into ``output_dir``, atomically (never half-written)."""
    path = Path(output_dir) / "metrics.json"
    flat = {k: float(v) for k, v in sorted(metrics.items())}
    atomic_write_text(path, json.dumps(flat, indent=2) + "\n")
    return path


def close_loggers(loggers: list, status: str = "success") -> None:
    """Finalize loggers; W&B runs are finished so the offline run folder holds its summary and config
    (``status="failed"``: the run is marked failed, and what was logged before the error is kept)."""
    for lg in loggers:
        lg.finalize(status)
        if type(lg).__name__ == "WandbLogger":
            import wandb

            if wandb.run is not None:
                wandb.finish(exit_code=0 if status == "success" else 1)
