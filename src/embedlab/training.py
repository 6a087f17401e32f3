"""``train(cfg)``: build everything from the Hydra config, fit, test the best checkpoint, save the model.

Importable and returning ``(metrics, objects)`` so tests drive it with a composed config; ``train.py`` is a
thin Hydra entry point around it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def instantiate_list(cfg: DictConfig | None) -> list:
    """Instantiate every ``_target_`` entry of a config group mapping (callbacks, loggers)."""
    if not cfg:
        return []
    return [instantiate(c) for c in cfg.values() if isinstance(c, DictConfig) and "_target_" in c]


def write_metrics(metrics: dict[str, Any], output_dir: str | Path) -> Path:
    """Write a flat ``metrics.json`` (floats only) into ``output_dir``."""
    path = Path(output_dir) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {k: float(v) for k, v in sorted(metrics.items())}
    path.write_text(json.dumps(flat, indent=2) + "\n")
    return path


def close_loggers(loggers: list) -> None:
    """Finalize loggers; W&B runs are finished so the offline run folder holds its summary and config."""
    for lg in loggers:
        lg.finalize("success")
        if type(lg).__name__ == "WandbLogger":
            import wandb

            if wandb.run is not None:
                wandb.finish()


def _drop_monitors_without_validation(callbacks: list) -> list:
    """Without a validation split nothing can be monitored: checkpoint the last step, stop no early."""
    kept = []
    for cb in callbacks:
        if isinstance(cb, EarlyStopping):
            log.warning("no validation split: early stopping disabled")
            continue
        if isinstance(cb, ModelCheckpoint) and cb.monitor is not None:
            log.warning("no validation split: checkpointing the last step instead of the best %s", cb.monitor)
            cb.monitor = None
            cb.save_top_k = 1
        kept.append(cb)
    return kept


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit the model of ``cfg``, test the best checkpoint, save it in sentence-transformers format.

    Returns the metrics written to ``<output_dir>/metrics.json`` and the objects built (cfg, datamodule,
    module, trainer, model_dir) for tests and scripts.
    """
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)

    log.info("data <%s>", cfg.data._target_)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")

    log.info("model <%s> from %s", cfg.model._target_, cfg.model.get("path", "random init"))
    model = instantiate(cfg.model)
    loss = instantiate(cfg.loss)
    module = instantiate(cfg.module, model=model, loss=loss)
    module.model_cfg = OmegaConf.to_container(cfg.model, resolve=True)

    callbacks = instantiate_list(cfg.get("callbacks"))
    if datamodule.val_evaluator is None:
        callbacks = _drop_monitors_without_validation(callbacks)
    loggers = instantiate_list(cfg.get("logger"))
    if not loggers:
        # LearningRateMonitor refuses to run without a logger; the LR is then simply not recorded
        callbacks = [cb for cb in callbacks if not isinstance(cb, LearningRateMonitor)]
    # GradCache (manual optimization) clips and accumulates in the module: it takes those Trainer flags over
    overrides = module.trainer_overrides(cfg.trainer) if hasattr(module, "trainer_overrides") else {}
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **overrides)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "train/"))}

    checkpoint = trainer.checkpoint_callback
    best = checkpoint.best_model_path if checkpoint is not None and checkpoint.best_model_path else None
    restore = best  # the checkpoint still to load into `module` before testing and saving
    if cfg.get("rotation"):
        # the rotation is fitted on the best weights, so restore them first and test the rotated model as is
        if restore:
            module.load_state_dict(_load_state_dict(restore))
            restore = None
        metrics.update(_fit_rotation(cfg, module, datamodule, output_dir, trainer.is_global_zero))
    if cfg.get("test") and datamodule.test_source is not None:
        # ckpt_path="best" restores the best weights into `module`, so the model saved below is the best one
        trainer.test(module, datamodule=datamodule, ckpt_path=restore, weights_only=False)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
    elif restore:
        module.load_state_dict(_load_state_dict(restore))

    model_dir = None
    if trainer.is_global_zero:
        if cfg.get("save_model", True):
            model_dir = module.model.save(output_dir / "model")
            log.info("saved model to %s", model_dir)
        write_metrics(metrics, output_dir)
        for lg in loggers:
            lg.log_metrics({k: v for k, v in metrics.items() if k.startswith(("test/", "rotation/"))})
    close_loggers(loggers)
    objects = {"cfg": cfg, "datamodule": datamodule, "module": module, "trainer": trainer, "model_dir": model_dir, "best_checkpoint": best}
    return metrics, objects


def _fit_rotation(cfg: DictConfig, module, datamodule, output_dir: Path, write: bool) -> dict[str, float]:
    """Fit ``cfg.rotation`` on the training examples, fold it into ``module.model``; ``rotation/...`` metrics.

    Every rank fits the same rotation (same data, same seed), so DDP ranks stay identical without a broadcast.
    """
    from embedlab.rotation import apply_rotation

    rotation = instantiate(cfg.rotation)
    result = rotation.fit(module.model, datamodule.train_examples, datamodule.val_evaluator)
    apply_rotation(module.model, result.rotation)
    if write:
        _write_history(result.history, output_dir / "rotation_history.csv")
    return result.metrics()


def _write_history(rows: list[dict[str, float]], path: Path) -> None:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _load_state_dict(path: str) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
