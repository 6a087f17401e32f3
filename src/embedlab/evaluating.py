"""``evaluate(cfg)``: score any bi-encoder on a dataset's test split and write ``metrics.json``.

The model is a config (``model=minilm_l6``), a Hugging Face / sentence-transformers folder
(``model.path=FOLDER``) or an embedlab checkpoint (``model.path=run/checkpoints/best.ckpt``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from embedlab.data.errors import DataError
from embedlab.evaluation.evaluators import build_evaluator, with_model_similarity
from embedlab.evaluation.grid import report_grid
from embedlab.training import close_loggers, instantiate_list, write_metrics

log = logging.getLogger(__name__)


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def evaluate(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Evaluate ``cfg.model`` on ``cfg.data.test`` with the ``eval`` options; returns (metrics, objects).

    Only the test source is built: a data config whose training path is unset (``data=file``, ``data=pairs``)
    evaluates as well as a full one.
    """
    if cfg.data.get("test") is None:
        raise DataError(
            f"data config {cfg.data.get('name', '')!r} has no test source: set data.test "
            "(e.g. data=file data.test.path=FILE, or a BEIR folder / STS file)"
        )
    task = instantiate(cfg.data.test).task()
    model = instantiate(cfg.model).to(resolve_device(cfg.get("device")))
    evaluator = build_evaluator(task, **with_model_similarity(OmegaConf.to_container(cfg.eval, resolve=True), model))
    start = time.perf_counter()
    metrics = evaluator.evaluate(model, prefix="test/", show_progress_bar=cfg.get("progress_bar", True))
    metrics["test/eval_seconds"] = time.perf_counter() - start
    for name, value in sorted(metrics.items()):
        log.info("%s = %.4f", name, value)

    output_dir = Path(cfg.paths.output_dir)
    write_metrics(metrics, output_dir)
    loggers = instantiate_list(cfg.get("logger"))
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False))
        lg.log_metrics(metrics)
    if evaluator.last_grid:
        files = report_grid(evaluator.last_grid, output_dir, "test_grid", loggers)
        log.info("compression grid: %s, %s", files["csv"], files["png"])
    close_loggers(loggers)
    return metrics, {"cfg": cfg, "model": model, "task": task, "evaluator": evaluator}
