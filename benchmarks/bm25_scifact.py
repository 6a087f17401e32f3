"""BM25 on SciFact (BEIR test split) with embedlab's BM25Retriever: stemming x stopwords, beside published figures.

Each variant indexes the corpus (title + text, as :func:`embedlab.data.readers.load_beir` joins them), retrieves the
top 100 of every test query, and is scored by :func:`embedlab.evaluation.metrics.retrieval_metrics` (equal to
pytrec_eval). Writes a markdown report.

    nice env OMP_NUM_THREADS=1 python benchmarks/bm25_scifact.py --data /work/shared/data/scifact \
        --out benchmarks/results/bm25_scifact.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from importlib.metadata import version

from embedlab.atomic import atomic_write_text
from embedlab.data import BeirSource
from embedlab.evaluation.first_stage import BM25Retriever
from embedlab.evaluation.metrics import retrieval_metrics

#: (label, BM25Retriever keyword arguments); the first four at bm25s' defaults (k1 1.5, b 0.75, lucene)
VARIANTS = [
    ("stemmer english, stopwords en", {"stemmer": "english", "stopwords": "en"}),
    ("stemmer english, stopwords none", {"stemmer": "english", "stopwords": None}),
    ("stemmer none, stopwords en", {"stemmer": None, "stopwords": "en"}),
    ("stemmer none, stopwords none", {"stemmer": None, "stopwords": None}),
    ("stemmer english, stopwords en, k1 1.2 (Elasticsearch's k1)", {"k1": 1.2}),
    ("stemmer english, stopwords en, k1 0.9, b 0.4 (Pyserini's)", {"k1": 0.9, "b": 0.4}),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="/work/shared/data/scifact")
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--out", default="benchmarks/results/bm25_scifact.md")
    args = parser.parse_args()

    task = BeirSource(args.data, split="test").task()
    rows = []
    for label, kwargs in VARIANTS:
        retriever = BM25Retriever(**kwargs)
        start = time.perf_counter()
        retriever.retrieve(task, args.top_k, show_progress_bar=False)  # index (once per corpus) + retrieve
        first = time.perf_counter() - start
        start = time.perf_counter()
        run = retriever.retrieve(task, args.top_k, show_progress_bar=False)  # the index is reused
        again = time.perf_counter() - start
        m = retrieval_metrics(run, task.qrels, k_values=(10, 100), prefix="")
        rows.append((label, m["ndcg@10"], m["recall@100"], m["mrr@10"], first, again))
        print(f"{label}: nDCG@10 {m['ndcg@10']:.4f}  R@100 {m['recall@100']:.4f}  {first:.2f}s / {again:.2f}s")

    ndcg_of = [row[1] for row in rows]
    recall_of = [row[2] for row in rows]
    lines = [
        "# BM25 on SciFact (BEIR test split)",
        "",
        (f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, bm25s {version('bm25s')}, PyStemmer {version('PyStemmer')}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, run under `nice` beside a training job"),
        f"- command: `nice env OMP_NUM_THREADS=1 python {' '.join(sys.argv)}`",
        (f"- data: {len(task.corpus)} documents (title + text), {len(task.queries)} test queries; top {args.top_k} "
        "per query; metrics: embedlab.evaluation.metrics.retrieval_metrics (= pytrec_eval)"),
        ("- retriever: embedlab.evaluation.first_stage.BM25Retriever (bm25s, method lucene; k1 1.5, b 0.75 unless "
        "said); seconds: first call (tokenize + index + retrieve), second call (retrieve only, cached index)"),
        "",
        "| variant | nDCG@10 | Recall@100 | MRR@10 | seconds (index + retrieve) | seconds (retrieve) |",
        "|---|---|---|---|---|---|",
    ]
    for label, ndcg, recall, mrr, first, again in rows:
        lines.append(f"| {label} | {ndcg:.4f} | {recall:.4f} | {mrr:.4f} | {first:.2f} | {again:.2f} |")
    lines += [
        "",
        "Published nDCG@10 for comparison:",
        "",
        "| system | nDCG@10 |",
        "|---|---|",
        "| BEIR paper (Thakur et al. 2021), BM25 = Elasticsearch, title + text fields, English analyzer | 0.665 |",
        "| bm25s (Lù 2024) README, lucene, k1 1.5, b 0.75, English stemmer + stopwords | 0.687 |",
        "",
        "Why the figures differ:",
        "",
        (f"- The first row is bm25s' own published setting: {ndcg_of[0]:.4f} here against 0.687 (published to "
        "three decimals); differences of this order come from the text indexed (embedlab joins title and text "
        "with one space, as BEIR and MTEB embed them; bm25s' benchmark builds its own corpus strings) and from the "
        "order among tied scores at the cut."),
        ("- The BEIR paper's 0.665 is Elasticsearch's BM25 (k1 1.2, b 0.75) over two fields, title and text, "
        "searched by a `multi_match` best-fields query (tie breaker 0.5), with the Lucene English analyzer "
        "(Lucene's stopword list, possessive removal and the Porter stemmer, not Snowball English) and Lucene's "
        "lossy one-byte encoding of document length. Tokenization and field weighting, not a different BM25 "
        "formula, separate it from the rows above."),
        (f"- Stemming (rows 1 vs 3, stopwords on): {ndcg_of[0] - ndcg_of[2]:+.4f} nDCG@10, "
        f"{recall_of[0] - recall_of[2]:+.4f} Recall@100; stopwords (rows 1 vs 2, stemming on): "
        f"{ndcg_of[0] - ndcg_of[1]:+.4f} nDCG@10, {recall_of[0] - recall_of[1]:+.4f} Recall@100. Stemming lets a "
        "query match the other inflections of its terms in the abstracts; stopwords carry little weight anyway "
        "under Lucene's idf, so removing them mostly saves time."),
        "",
    ]
    atomic_write_text(args.out, "\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
