"""The compression grid: every cell equals a naive per-cell evaluation; memory stays bounded on a large corpus."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from embedlab.data.records import RetrievalTask
from embedlab.evaluation.evaluators import RetrievalEvaluator
from embedlab.evaluation.grid import CompressionGrid, report_grid
from embedlab.evaluation.metrics import retrieval_metrics
from embedlab.evaluation.quantize import fit_scalar_quantizer
from embedlab.evaluation.reduction import fit_pca
from embedlab.peak_memory import reset_peak_rss, status_kb
from tests.conftest import compose_config


def _synthetic(n_docs: int, n_queries: int, dim: int, seed: int = 0):
    """Queries are noisy copies of their relevant document: every compression keeps most of them findable."""
    g = torch.Generator().manual_seed(seed)
    corpus = torch.randn(n_docs, dim, generator=g)
    targets = torch.randint(0, n_docs, (n_queries,), generator=g)
    queries = corpus[targets] + 0.8 * torch.randn(n_queries, dim, generator=g)
    task = RetrievalTask(
        corpus={f"d{i}": "" for i in range(n_docs)},
        queries={f"q{i}": "" for i in range(n_queries)},
        qrels={f"q{i}": {f"d{int(t)}": 1} for i, t in enumerate(targets)},
    )
    return task, queries, corpus


def _ranked(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of a full score matrix by a stable sort: score descending, ties by lower index."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, order), order


def _naive_cell(task, q, c, space_fn, precision, top_k, rescore_multiplier=4):
    """One cell, the slow obvious way: full score matrix, full stable sort, no chunking."""
    q, c = space_fn(q), space_fn(c)
    q, c = F.normalize(q, dim=-1), F.normalize(c, dim=-1)
    if precision == "float32":
        scores = q @ c.T
    elif precision == "int8":
        quant = fit_scalar_quantizer(c, "int8")
        scores = q @ quant.dequantize(quant.quantize(c)).T
    elif precision == "binary":
        qb, cb = (q > 0), (c > 0)
        scores = -(qb[:, None, :] != cb[None, :, :]).sum(-1).float()  # -Hamming
    else:  # binary_rescore with int8 documents
        qb, cb = (q > 0), (c > 0)
        ham = (qb[:, None, :] != cb[None, :, :]).sum(-1).float()
        n_cand = min(top_k * rescore_multiplier, c.shape[0])
        # candidates: smallest Hamming distance, ties by lower index (stable sort)
        cand = torch.sort(ham, dim=1, stable=True).indices[:, :n_cand]
        quant = fit_scalar_quantizer(c, "int8")
        deq = quant.dequantize(quant.quantize(c))
        scores = torch.full_like(ham, float("-inf"))
        scores.scatter_(1, cand, (q[:, None, :] * deq[cand]).sum(-1))
    values, indices = _ranked(scores, min(top_k, c.shape[0]))
    qids, cids = list(task.queries), list(task.corpus)
    run = {qids[i]: {cids[int(j)]: float(s) for s, j in zip(values[i], indices[i]) if s > float("-inf")} for i in range(len(qids))}
    return retrieval_metrics(run, task.qrels, k_values=(10,), prefix="")


def test_grid_cells_equal_naive_evaluation():
    task, q, c = _synthetic(n_docs=300, n_queries=40, dim=32)
    evaluator = RetrievalEvaluator(
        task, k_values=(10,), top_k=10, dims=(32, 16, 8), precisions=("float32", "int8", "binary", "binary_rescore"),
        pca=(8,), corpus_chunk_size=70, query_chunk_size=16,
    )
    metrics = evaluator.compute({"query": q, "document": c}, prefix="test/")
    assert len(evaluator.last_grid) == 4 * 4
    for d in (32, 16, 8):
        # bytes stored per document, by hand: (index, rescoring copy); binary_rescore keeps int8 rows to rescore
        stored = {"float32": (4 * d, 0), "int8": (d, 0), "binary": (d // 8, 0), "binary_rescore": (d // 8, d)}
        for precision in ("float32", "int8", "binary", "binary_rescore"):
            suffix = f"@dim{d}" if precision == "float32" else f"@dim{d}@{precision}"
            naive = _naive_cell(task, q, c, lambda x: x[:, :d], precision, top_k=10)
            assert metrics[f"test/ndcg@10{suffix}"] == pytest.approx(naive["ndcg@10"], abs=1e-12), (d, precision)
            index, rescore = stored[precision]
            assert metrics[f"test/index_bytes{suffix}"] == index and metrics[f"test/rescore_bytes{suffix}"] == rescore
            assert metrics[f"test/bytes_per_vector{suffix}"] == index + rescore
    pca = fit_pca(c, 8)
    naive = _naive_cell(task, q, c, pca.transform, "float32", top_k=10)
    assert metrics["test/ndcg@10@pca8"] == pytest.approx(naive["ndcg@10"], abs=1e-12)
    # the full-size float32 cell is the plain evaluation
    assert metrics["test/ndcg@10@dim32"] == pytest.approx(metrics["test/ndcg@10"], abs=1e-12)


def test_binary_cell_equals_naive_hamming_with_ties():
    """24 bits over 200 docs: Hamming distances tie at the top-10 cut for most queries. The search keeps the
    lower corpus indices among tied distances, as a stable full sort does, so every metric is equal."""
    task, q, c = _synthetic(n_docs=200, n_queries=30, dim=24, seed=1)
    evaluator = RetrievalEvaluator(task, k_values=(10,), top_k=10, precisions=("binary",), corpus_chunk_size=37)
    metrics = evaluator.compute({"query": q, "document": c}, prefix="")
    naive = _naive_cell(task, q, c, lambda x: x, "binary", top_k=10)
    hamming = (q[:, None, :] > 0).ne(c[None, :, :] > 0).sum(-1)  # (Q, N)
    tenth = hamming.sort(dim=1).values[:, 9:11]
    assert (tenth[:, 0] == tenth[:, 1]).sum() > 15  # the data does tie at the cut
    for name in ("recall@10", "ndcg@10", "map@10", "mrr@10", "precision@10"):
        assert metrics[f"{name}@dim24@binary"] == pytest.approx(naive[name], abs=1e-12), name


def test_grid_report_files_and_wandb_keys(tmp_path, monkeypatch):
    import matplotlib.axes

    task, q, c = _synthetic(n_docs=100, n_queries=10, dim=16)
    evaluator = RetrievalEvaluator(task, dims=(16, 8), precisions=("float32", "int8", "binary_rescore"))
    evaluator.compute({"query": q, "document": c})
    plotted = {}  # legend label -> x values of its line
    real_plot = matplotlib.axes.Axes.plot

    def plot(self, x, y, *args, label=None, **kwargs):
        plotted[label] = list(x)
        return real_plot(self, x, y, *args, label=label, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)

    class FakeWandb:
        def __init__(self):
            self.tables, self.images = [], []

        def log_table(self, key, columns, data):
            self.tables.append((key, columns, data))

        def log_image(self, key, images):
            self.images.append((key, images))

    fake = FakeWandb()
    files = report_grid(evaluator.last_grid, tmp_path, "test_grid", [fake])
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(files["csv"].open()))
    assert list(rows[0])[:8] == [
        "space", "dim", "precision", "index_bytes", "rescore_bytes", "bytes_per_vector", "search_seconds", "ndcg@10",
    ]
    # bytes by hand: float32 4 per dim; int8 1 per dim; binary_rescore: 1 bit per dim + an int8 row to rescore
    stored = {("16", "float32"): (64, 0), ("16", "int8"): (16, 0), ("16", "binary_rescore"): (2, 16),
              ("8", "float32"): (32, 0), ("8", "int8"): (8, 0), ("8", "binary_rescore"): (1, 8)}
    assert {(r["dim"], r["precision"]): (int(r["index_bytes"]), int(r["rescore_bytes"])) for r in rows} == stored
    assert all(int(r["bytes_per_vector"]) == sum(stored[r["dim"], r["precision"]]) for r in rows)
    # the plot's x axis is what is stored per vector, index + rescoring copy (each line sorted by bytes)
    assert plotted == {"float32": [32, 64], "int8": [8, 16], "binary_rescore": [9, 18]}
    (key, columns, rows), = fake.tables
    assert key == "test_grid/table" and len(rows) == 6 and columns[:3] == ["space", "dim", "precision"]
    assert fake.images[0][0] == "test_grid/plot"


def test_evaluate_py_grid_writes_metrics_csv_png(tmp_path, tiny_data_root):
    from embedlab.evaluating import evaluate

    cfg = compose_config(
        "evaluate",
        ["model=tiny", f"data.root={tiny_data_root}", "logger=none", "progress_bar=false",
         "eval.dims=[32,16]", "eval.precisions=[float32,int8,binary,binary_rescore]", "eval.pca=[8]"],
        tmp_path,
    )
    metrics, _ = evaluate(cfg)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["test/ndcg@10@dim16@int8"] == pytest.approx(metrics["test/ndcg@10@dim16@int8"])
    assert "test/bytes_per_vector@pca8@binary_rescore" in written
    assert (tmp_path / "test_grid.png").is_file() and (tmp_path / "test_grid.csv").is_file()


def test_unknown_precision_message():
    with pytest.raises(ValueError, match=r"unknown precision\(s\) \['int4'\]; valid: float32, float16, int8"):
        CompressionGrid(precisions=("float32", "int4"))
    with pytest.raises(ValueError, match=r"rescore_with must be one of int8, float32, binary, got 'int4'"):
        CompressionGrid(rescore_with="int4")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to read peak memory")
def test_grid_memory_bounded_on_200k_corpus():
    """Grid over a synthetic 200k x 384 corpus (293 MiB float32): peak growth < 4x the corpus size.

    Bound: the per-dim truncated copy of the corpus (<= 1x), its int8 codes (0.25x) and packed bits, plus
    chunk-sized score blocks; a full queries x corpus matrix or a per-cell full copy beyond that would exceed it.
    """
    n, dim, nq = 200_000, 384, 64
    g = torch.Generator().manual_seed(0)
    corpus = torch.randn(n, dim, generator=g)
    queries = corpus[:nq] + 0.5 * torch.randn(nq, dim, generator=g)
    task = RetrievalTask(corpus={f"d{i}": "" for i in range(n)}, queries={f"q{i}": "" for i in range(nq)},
                         qrels={f"q{i}": {f"d{i}": 1} for i in range(nq)})
    corpus_mb = corpus.numel() * 4 / 2**20
    evaluator = RetrievalEvaluator(task, k_values=(10,), top_k=10, dims=(384, 64),
                                   precisions=("float32", "int8", "binary_rescore"), corpus_chunk_size=20_000)
    assert reset_peak_rss()  # VmHWM = the current RSS
    before = status_kb("VmHWM") / 1024
    metrics = evaluator.compute({"query": queries, "document": corpus}, prefix="")
    growth = status_kb("VmHWM") / 1024 - before
    assert growth < 4 * corpus_mb, f"peak grew {growth:.0f} MiB for a {corpus_mb:.0f} MiB corpus"
    # the chunked cells equal a full-matrix evaluation (64 x 200k scores, affordable once the peak is read)
    for d in (384, 64):
        naive = _naive_cell(task, queries, corpus, lambda x: x[:, :d], "float32", top_k=10)
        assert metrics[f"recall@10@dim{d}"] == pytest.approx(naive["recall@10"], abs=1e-12), d
        assert metrics[f"ndcg@10@dim{d}"] == pytest.approx(naive["ndcg@10"], abs=1e-12), d


def test_grid_report_with_other_k_values(tmp_path):
    """eval.k_values without 10 and 100: the report tabulates and plots the metrics the run has."""
    task, q, c = _synthetic(n_docs=60, n_queries=6, dim=16)
    evaluator = RetrievalEvaluator(task, k_values=(1, 5), top_k=5, dims=(16, 8), precisions=("float32", "int8"))
    evaluator.compute({"query": q, "document": c})
    files = report_grid(evaluator.last_grid, tmp_path, "grid", [])
    rows = list(csv.DictReader(files["csv"].open()))
    cell = next(c for c in evaluator.last_grid if (c.dim, c.precision) == (8, "int8"))
    row = next(r for r in rows if (r["dim"], r["precision"]) == ("8", "int8"))
    assert float(row["ndcg@5"]) == pytest.approx(cell.metrics["ndcg@5"], abs=1e-9)
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
