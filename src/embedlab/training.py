"""``train(cfg)``: build everything from the Hydra config, fit, run post-fit stages, test the best weights, save.

Importable and returning ``(metrics, objects)`` so tests drive it with a composed config; ``train.py`` is a
thin Hydra entry point around it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from embedlab.models.checkpoint import safe_load
from embedlab.outputs import close_loggers, instantiate_list, write_metrics

log = logging.getLogger(__name__)


def partial_validation(trainer_cfg: DictConfig) -> str | None:
    """Why validation will see only part of its task (a Trainer debugging flag), or ``None`` when it sees all."""
    if trainer_cfg.get("fast_dev_run"):
        return f"fast_dev_run={trainer_cfg.fast_dev_run}"
    if trainer_cfg.get("overfit_batches"):
        return f"overfit_batches={trainer_cfg.overfit_batches}"
    limit = trainer_cfg.get("limit_val_batches")
    # Lightning: a float is a fraction of the batches (1.0: all), an int a number of batches
    if limit is not None and not (isinstance(limit, float) and limit == 1.0):
        return f"limit_val_batches={limit}"
    return None


def drop_monitors(callbacks: list, reason: str) -> list:
    """Without complete validation metrics nothing can be monitored: keep the last checkpoint, stop no early."""
    kept = []
    for cb in callbacks:
        if isinstance(cb, EarlyStopping):
            log.warning("%s: early stopping on %s is off", reason, cb.monitor)
            continue
        if isinstance(cb, ModelCheckpoint) and cb.monitor is not None:
            log.warning("%s: keeping the last checkpoint instead of the best by %s", reason, cb.monitor)
            cb.monitor = None
            cb.save_top_k = 0  # no "best" file: it would only be the last one under another name
        kept.append(cb)
    return kept


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit the module of ``cfg``, run the post-fit stages and test on the best weights, save the model.

    Every object comes from its config group (``data``, ``model``, ``loss``, ``module``, ``trainer``,
    ``callbacks``, ``logger``, ``post_fit``); nothing here knows a model family. Returns the metrics written to
    ``<output_dir>/metrics.json`` and the objects built (cfg, datamodule, module, trainer, model_dir,
    best_checkpoint) for tests and scripts. ``val/*`` metrics are those of the validation the checkpoint
    selected (the best by ``monitor``; the last without one), so the optimized metric is the best value.
    """
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    log.info("data <%s>", cfg.data._target_)
    datamodule = instantiate(cfg.data)
    log.info("model <%s> from %s", cfg.model._target_, cfg.model.get("path", "random init"))
    model = instantiate(cfg.model)
    loss = instantiate(cfg.loss)
    module = instantiate(cfg.module, model=model, loss=loss)

    callbacks = instantiate_list(cfg.get("callbacks"))
    partial = "no validation split" if not datamodule.has_validation else partial_validation(cfg.trainer)
    if partial:
        callbacks = drop_monitors(callbacks, partial)
    loggers = instantiate_list(cfg.get("logger"))
    if not loggers:
        # LearningRateMonitor refuses to run without a logger; the LR is then simply not recorded
        callbacks = [cb for cb in callbacks if not isinstance(cb, LearningRateMonitor)]
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, **module.trainer_overrides(cfg.trainer)
    )
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    try:
        metrics, best, model_dir = _fit_test_save(cfg, datamodule, module, trainer, loggers)
    except BaseException:
        close_loggers(loggers, "failed")
        raise
    close_loggers(loggers)
    objects = {"cfg": cfg, "datamodule": datamodule, "module": module, "trainer": trainer, "model_dir": model_dir, "best_checkpoint": best}
    return metrics, objects


def _fit_test_save(cfg: DictConfig, datamodule, module, trainer: L.Trainer, loggers: list) -> tuple[dict[str, float], str | None, Path | None]:
    """Fit, select the best validation, run the post-fit stages, test, save: ``(metrics, best checkpoint, model dir)``."""
    output_dir = Path(cfg.paths.output_dir)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "train/"))}
    # this process's fit (a resumed run counts from its restart), validations included
    metrics["train/fit_seconds"] = time.perf_counter() - start

    checkpoint = trainer.checkpoint_callback
    best = checkpoint.best_model_path if checkpoint is not None and checkpoint.best_model_path else None
    if checkpoint is not None and checkpoint.monitor:
        selected = module.best_validation(checkpoint.monitor, checkpoint.mode)
        if selected is not None:
            metrics.update({k: v for k, v in selected.items() if k.startswith("val/")})
            metrics["val/best_epoch"] = selected["epoch"]
    if best:
        # the best weights are the ones every later stage, the test and the saved model use
        module.load_state_dict(safe_load(best)["state_dict"])
    for stage in instantiate_list(cfg.get("post_fit")):
        metrics.update(stage.run(module, datamodule, trainer))
    if cfg.get("test") and datamodule.test_source is not None:
        trainer.test(module, datamodule=datamodule)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})

    model_dir = None
    if trainer.is_global_zero:
        if cfg.get("save_model", True):
            model_dir = module.model.save(output_dir / "model")
            log.info("saved model to %s", model_dir)
        write_metrics(metrics, output_dir)
        for lg in loggers:
            # train/* and val/* were logged during fitting; val/best_epoch says which validation was selected
            once = ("val/best_epoch", "train/fit_seconds")
            lg.log_metrics({k: v for k, v in metrics.items() if not k.startswith(("train/", "val/")) or k in once})
    return metrics, best, model_dir
