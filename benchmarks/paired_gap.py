"""Is a difference in nDCG@10 between two fine-tunes larger than the test set can resolve?

Both models are scored on the same test queries at each Matryoshka dim; the per-query differences
(model A minus model B) give the mean gap, a paired bootstrap 95 % interval (queries resampled with
replacement) and a two-sided paired sign-flip permutation p-value: the per-query units of the evaluator's
compression grid (each model encoded once, the dims truncations of that encoding) and the paired test of
report.py (:func:`embedlab.evaluation.significance.paired_over_seeds`). Runs that are already trained and
evaluated need no re-encoding: ``python report.py`` reads their per-query files.

    python benchmarks/paired_gap.py --data-root ../shared/data \
        --pair matryoshka=RUN_A/model,plain=RUN_B/model --dims 384,64 --out benchmarks/results/paired_gap.md

``--pair`` may be repeated; a model folder shared by several pairs is encoded once. ``--ratio NAME`` also reports
NAME's ``nDCG@10(dim_low) / nDCG@10(dim_high)`` with a bootstrap interval (the Matryoshka retention ratio).

``--by-train-overlap`` repeats every row on two subsets of the test queries: ``seen`` (at least one relevant
document is also relevant to a training query, in ``qrels/train.tsv``) and ``unseen`` (none is). On SciFact 181 of
the 283 relevant test documents are also training positives, so a model can score on ``seen`` queries by
remembering which documents were relevant in training; ``unseen`` shows what is left without that.
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import numpy as np
import torch

from embedlab.data.readers import load_beir
from embedlab.evaluation.evaluators import RetrievalEvaluator
from embedlab.evaluation.per_query import PerQuery
from embedlab.evaluation.significance import paired_over_seeds
from embedlab.evaluation.significance import train_overlap_subsets as overlap_subsets
from embedlab.models import BiEncoder


def per_query_units(model_path: str, task, dims: list[int], batch_size: int) -> PerQuery:
    """Each test query's ``test/ndcg@10@dim<d>``: the evaluator's per-query units of one encoding, its compression
    grid giving the truncated dims (the same units training writes to ``test_per_query.jsonl``)."""
    model = BiEncoder.from_pretrained(model_path).eval()
    evaluator = RetrievalEvaluator(task, k_values=(10,), dims=dims, batch_size=batch_size)
    with torch.no_grad():
        evaluator.evaluate(model, prefix="test/")
    return evaluator.last_per_query


def metric(dim: int) -> str:
    return f"test/ndcg@10@dim{dim}"


def column(units: PerQuery, dim: int, ids: list[str]) -> np.ndarray:
    return np.array([units[q][metric(dim)] for q in ids])


def train_overlap_subsets(folder: Path, task) -> dict[str, np.ndarray]:
    """``{"all", "seen", "unseen"}`` -> boolean masks over ``task.qrels``' queries (see the module docstring)."""
    return overlap_subsets(task.qrels, load_beir(folder, split="train").qrels)


def ratio_stats(low: np.ndarray, high: np.ndarray, resamples: int, rng: np.random.Generator) -> dict[str, float]:
    idx = rng.integers(0, len(low), size=(resamples, len(low)))
    boot = 100 * low[idx].mean(axis=1) / high[idx].mean(axis=1)
    return {"ratio": 100 * low.mean() / high.mean(), "lo": np.percentile(boot, 2.5), "hi": np.percentile(boot, 97.5)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-root", default=os.environ.get("EMBEDLAB_DATA", "../shared/data"))
    parser.add_argument("--dataset", default="scifact")
    parser.add_argument("--pair", action="append", required=True, help="NAME_A=PATH_A,NAME_B=PATH_B (A minus B)")
    parser.add_argument("--ratio", action="append", default=[], help="a model NAME whose dim_low/dim_high ratio to report")
    parser.add_argument("--dims", default="384,64")
    parser.add_argument("--resamples", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results/paired_gap.md")
    parser.add_argument("--by-train-overlap", action="store_true", help="also report the seen / unseen query subsets")
    args = parser.parse_args()

    try:
        dims = [int(d) for d in args.dims.split(",")]
    except ValueError:
        parser.error(f"--dims {args.dims!r}: expected comma-separated integers, e.g. 384,64")
    pairs = []
    for spec in args.pair:
        sides = [side.split("=", 1) for side in spec.split(",")]
        if len(sides) != 2 or any(len(side) != 2 or not all(side) for side in sides):
            parser.error(f"--pair {spec!r}: expected NAME_A=PATH_A,NAME_B=PATH_B")
        pairs.append(tuple(tuple(side) for side in sides))
    missing = [p for pair in pairs for _, p in pair if not Path(p).is_dir()]
    if missing:
        parser.error(f"model folder(s) not found: {', '.join(missing)}")
    paths = {name: path for pair in pairs for name, path in pair}
    unknown = [name for name in args.ratio if name not in paths]
    if unknown:
        parser.error(f"--ratio {', '.join(unknown)}: not a model NAME of any --pair (known: {', '.join(paths)})")
    task = load_beir(Path(args.data_root) / args.dataset, split="test")
    subsets = {"all": np.ones(len(task.qrels), dtype=bool)}
    if args.by_train_overlap:
        subsets = train_overlap_subsets(Path(args.data_root) / args.dataset, task)
    encoded: dict[str, PerQuery] = {}
    for name, path in paths.items():
        print(f"encoding {name}: {path}", flush=True)
        encoded[name] = per_query_units(path, task, dims, args.batch_size)
    query_ids = list(task.qrels)
    rng = np.random.default_rng(args.seed)

    lines = [
        f"# Paired nDCG@10 gaps on {args.dataset} test ({len(task.queries)} queries)",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, cpu",
        "- command: `python benchmarks/paired_gap.py --data-root DATA " + " ".join(f"--pair {p}" for p in args.pair)
        + "".join(f" --ratio {r}" for r in args.ratio) + f" --dims {args.dims} --resamples {args.resamples} --seed {args.seed}"
        + (" --by-train-overlap" if args.by_train_overlap else "") + "`",
        "- gap = mean over queries of nDCG@10(A) − nDCG@10(B), in points; 95 % interval from a paired bootstrap over "
        "queries; p from a two-sided paired sign-flip permutation test; se = standard error of the mean difference.",
        "",
        "| A | B | queries | dim | A nDCG@10 | B nDCG@10 | gap (points) | 95 % interval | se | p |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (name_a, _), (name_b, _) in pairs:
        for subset, mask in subsets.items():
            ids = [q for q, keep in zip(query_ids, mask) if keep]
            if not ids:
                continue
            units_a = {q: encoded[name_a][q] for q in ids}
            units_b = {q: encoded[name_b][q] for q in ids}
            for dim in dims:
                a, b = column(units_a, dim, ids), column(units_b, dim, ids)
                s = paired_over_seeds([units_a], [units_b], metric(dim), args.resamples, args.seed)
                lines.append(
                    f"| {name_a} | {name_b} | {subset} ({mask.sum()}) | {dim} | {a.mean():.4f} | {b.mean():.4f} | {s['mean']:+.2f} | "
                    f"[{s['lo']:+.2f}, {s['hi']:+.2f}] | {s['se']:.2f} | {s['p']:.3f} |"
                )
    if args.ratio:
        low, high = min(dims), max(dims)
        lines += ["", f"| model | queries | dim{low} / dim{high} | 95 % interval |", "|---|---|---|---|"]
        for name in args.ratio:
            for subset, mask in subsets.items():
                ids = [q for q, keep in zip(query_ids, mask) if keep]
                if not ids:
                    continue
                r = ratio_stats(column(encoded[name], low, ids), column(encoded[name], high, ids), args.resamples, rng)
                lines.append(f"| {name} | {subset} ({mask.sum()}) | {r['ratio']:.1f} % | [{r['lo']:.1f}, {r['hi']:.1f}] % |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
