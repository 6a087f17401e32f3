"""Two training runs on the same test queries: the per-query difference in nDCG@10, read from their run files.

Each run folder holds the final ranking of its test step (``runs/test_run.trec``); nothing is re-encoded. For every
run B against run A: both means, the mean difference B - A in points with a paired bootstrap 95 % interval and a
sign-flip permutation p (:func:`embedlab.evaluation.significance.paired_stats`), on all test queries and on the
``seen`` / ``unseen`` subsets (``unseen``: none of the query's relevant documents is a training positive).

    python benchmarks/paired_runs.py --data ../shared/data/scifact --baseline mnrl=RUN_A \
        --run kl=RUN_B --out benchmarks/results/score_distillation.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import numpy as np

from embedlab.atomic import atomic_write_text
from embedlab.data import BeirSource
from embedlab.evaluation.metrics import per_query_metrics
from embedlab.evaluation.runs import read_run
from embedlab.evaluation.significance import paired_stats, train_overlap_subsets

METRIC = "ndcg@10"


def per_query(run_dir: Path, task) -> np.ndarray:
    """(Q,) nDCG@10 of each test query (``sorted(task.qrels)`` order) from ``run_dir/runs/test_run.trec``."""
    run = read_run(run_dir / "runs" / "test_run.trec", task)
    values = per_query_metrics(run, task.qrels, k_values=(10,))
    return np.array([values[q][METRIC] for q in sorted(task.qrels)])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/data/scifact")
    parser.add_argument("--baseline", required=True, help="NAME=RUN_DIR")
    parser.add_argument("--run", action="append", required=True, help="NAME=RUN_DIR (repeatable)")
    parser.add_argument("--note", default="", help="a line on how the runs were made")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    test = BeirSource(args.data, split="test").task()
    train_qrels = BeirSource(args.data, split="train").task().qrels
    qrels = {q: test.qrels[q] for q in sorted(test.qrels)}
    subsets = train_overlap_subsets(qrels, train_qrels)
    base_name, base_dir = args.baseline.split("=", 1)
    base = per_query(Path(base_dir), test)
    lines = [
        "# Paired comparison of training runs (SciFact test, nDCG@10 from each run's test_run.trec)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores. Baseline: `{base_name}` = `{base_dir}`.",
        *([args.note] if args.note else []),
        "",
        "| run | subset | queries | baseline | run | run - baseline (points) | 95% bootstrap | permutation p | wall (min) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for spec in args.run:
        name, run_dir = spec.split("=", 1)
        values = per_query(Path(run_dir), test)
        metrics = json.loads((Path(run_dir) / "metrics.json").read_text()) if (Path(run_dir) / "metrics.json").is_file() else {}
        wall = metrics.get("train/fit_seconds")
        for subset in ("all", "seen", "unseen"):
            mask = subsets[subset]
            s = paired_stats(values[mask], base[mask])
            lines.append(
                f"| {name} | {subset} | {int(mask.sum())} | {base[mask].mean():.4f} | {values[mask].mean():.4f} | {s['mean']:+.2f} "
                f"| [{s['lo']:+.2f}, {s['hi']:+.2f}] | {s['p']:.3f} | {'' if wall is None else f'{wall / 60:.1f}'} |"
            )
    atomic_write_text(Path(args.out), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
