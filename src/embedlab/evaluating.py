"""``evaluate(cfg)``: score a bi-encoder, a first stage or a two-stage pipeline on a dataset's test split.

One stage (default): the bi-encoder ``model`` (``model=minilm_l6``, a Hugging Face / sentence-transformers folder
``model.path=FOLDER``, or an embedlab checkpoint ``model.path=run/checkpoints/best.ckpt``) with the ``eval``
options. Two stages: ``retriever=dense|bm25|hybrid|run`` retrieves ``rerank.top_k`` candidates and
``rerank.model=CROSS_ENCODER`` reranks them (``test/...`` for the final list, ``test/first_stage/...`` for the
retriever). Writes ``metrics.json`` and the final ranking as a TREC run file (``test_run.trec``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from embedlab.cache import cache_from_options
from embedlab.data.errors import DataError
from embedlab.data.records import STSTask
from embedlab.errors import ConfigError
from embedlab.evaluation.evaluators import build_evaluator, encode_plan, with_model_similarity
from embedlab.evaluation.first_stage import DenseRetriever
from embedlab.evaluation.grid import report_grid
from embedlab.evaluation.rerank import CrossEncoderSTSEvaluator, RerankEvaluator
from embedlab.evaluation.per_query import per_query_path, write_per_query
from embedlab.evaluation.runs import write_trec_runs
from embedlab.models.cross_encoder import CrossEncoder
from embedlab.outputs import close_loggers, instantiate_list, write_metrics

log = logging.getLogger(__name__)


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def evaluate(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Evaluate ``cfg.model`` on ``cfg.data.test`` with the ``eval`` options; returns (metrics, objects).

    Only the test source is built: a data config whose training path is unset (``data=file``, ``data=pairs``)
    evaluates as well as a full one. With ``eval.cache_dir`` the bi-encoder's embeddings are read from / stored
    in an :class:`~embedlab.cache.EmbeddingCache` (docs/cache.md); ``test/eval_seconds`` then includes hashing
    the weights and, when some text is not cached, moving the model to the device.
    """
    if cfg.data.get("test") is None:
        raise DataError(
            f"data config {cfg.data.get('name', '')!r} has no test source: set data.test "
            "(e.g. data=file data.test.path=FILE, or a BEIR folder / STS file)"
        )
    task = instantiate(cfg.data.test).task()
    device = resolve_device(cfg.get("device"))
    rerank = cfg.get("rerank") or {}
    cache, options = cache_from_options(OmegaConf.to_container(cfg.eval, resolve=True))
    progress = cfg.get("progress_bar", True)
    if cfg.get("retriever") is None and not rerank.get("model"):
        model = instantiate(cfg.model)
        if cache is None:
            model = model.to(device)
        evaluator = build_evaluator(task, **with_model_similarity(options, model))
    else:
        if cache is not None:
            log.warning("eval.cache_dir is used by the bi-encoder evaluation only: the two-stage pipeline encodes without it")
            cache = None
        evaluator, model = two_stage(cfg, task, device)
    start = time.perf_counter()
    if cache is None:
        metrics = evaluator.evaluate(model, prefix="test/", show_progress_bar=progress)
    else:
        # evaluator.evaluate's two steps, the encoding through the cache; the model moves to the device only
        # when a text is missing from it (a full hit pays for neither the device start-up nor the copy)
        embeddings = encode_plan(model, evaluator.encode_plan(), evaluator.batch_size, progress, cache=cache, device=device)
        metrics = evaluator.compute(embeddings, prefix="test/")
    metrics["test/eval_seconds"] = time.perf_counter() - start
    for name, value in sorted(metrics.items()):
        log.info("%s = %.4f", name, value)

    output_dir = Path(cfg.paths.output_dir)
    write_metrics(metrics, output_dir)
    for path in write_trec_runs(evaluator.last_runs, output_dir, "test"):
        log.info("run file: %s", path)
    if evaluator.last_per_query:
        log.info("per-query values: %s", write_per_query(evaluator.last_per_query, per_query_path(output_dir, "test")))
    loggers = instantiate_list(cfg.get("logger"))
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False))
        lg.log_metrics(metrics)
    if evaluator.last_grid:
        files = report_grid(evaluator.last_grid, output_dir, "test_grid", loggers)
        log.info("compression grid: %s, %s", files["csv"], files["png"])
    close_loggers(loggers)
    return metrics, {"cfg": cfg, "model": model, "task": task, "evaluator": evaluator}


def two_stage(cfg: DictConfig, task, device: torch.device):
    """The evaluator and scorer of a first stage (``retriever``; default: dense with the bi-encoder ``model``)
    and an optional cross-encoder (``rerank.model``); an STS task is scored by the cross-encoder alone."""
    reranker = None
    if cfg.rerank.get("model"):
        reranker = CrossEncoder.from_pretrained(
            cfg.rerank.model, max_length=cfg.rerank.get("max_length"), require_head=True
        ).to(device)
    if isinstance(task, STSTask):
        if reranker is None or cfg.get("retriever") is not None:
            raise ConfigError(
                f"retriever=... needs a retrieval task; data {cfg.data.get('name', '')!r} is an STS task "
                "(score its pairs with a cross-encoder: rerank.model=FOLDER, no retriever)"
            )
        return CrossEncoderSTSEvaluator(task, batch_size=cfg.rerank.batch_size), reranker
    if cfg.get("retriever") is not None:
        first_stage = instantiate(cfg.retriever)
    else:
        first_stage = DenseRetriever(
            model=instantiate(cfg.model), batch_size=cfg.eval.batch_size, similarity=cfg.eval.similarity,
            search=cfg.eval.search, query_chunk_size=cfg.eval.query_chunk_size, corpus_chunk_size=cfg.eval.corpus_chunk_size,
        )
    for model in getattr(first_stage, "models", lambda: [])():
        model.to(device)
    evaluator = RerankEvaluator(
        task, first_stage, top_k=cfg.rerank.top_k, k_values=list(cfg.eval.k_values), batch_size=cfg.rerank.batch_size,
        ignore_identical_ids=cfg.eval.ignore_identical_ids,
    )
    return evaluator, reranker
