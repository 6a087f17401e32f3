"""Is a difference in nDCG@10 between two fine-tunes larger than the test set can resolve?

Both models are scored on the same test queries at each Matryoshka dim; the per-query differences
(model A minus model B) give the mean gap, a paired bootstrap 95 % interval (queries resampled with
replacement) and a two-sided paired sign-flip permutation p-value. Each model is encoded once; the dims are
truncations of that one encoding (re-normalised, as the evaluation grid does).

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
from embedlab.evaluation.reduction import truncate
from embedlab.evaluation.evaluators import RetrievalEvaluator, encode_plan
from embedlab.evaluation.metrics import per_query_metrics
from embedlab.evaluation.search import exact_search, search_to_run
from embedlab.evaluation.significance import paired_stats
from embedlab.evaluation.significance import train_overlap_subsets as overlap_subsets
from embedlab.models import BiEncoder


def per_query_ndcg(model_path: str, task, dims: list[int], batch_size: int) -> dict[int, np.ndarray]:
    """``{dim: (Q,) nDCG@10 per test query}``, queries in qrels order (``task.qrels``)."""
    model = BiEncoder.from_pretrained(model_path).eval()
    evaluator = RetrievalEvaluator(task)  # its encode plan and id order: the texts the training-time evaluation scores
    with torch.no_grad():
        emb = encode_plan(model, evaluator.encode_plan(), batch_size, show_progress_bar=True)
    out = {}
    for dim in dims:
        scores, indices = exact_search(truncate(emb["query"], dim), truncate(emb["document"], dim), top_k=10)
        run = search_to_run(scores, indices, evaluator.query_ids, evaluator.corpus_ids)
        per_query = per_query_metrics(run, task.qrels, k_values=(10,))
        out[dim] = np.array([per_query[q]["ndcg@10"] for q in task.qrels])
    return out


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
    encoded: dict[str, dict[int, np.ndarray]] = {}
    for name, path in paths.items():
        print(f"encoding {name}: {path}", flush=True)
        encoded[name] = per_query_ndcg(path, task, dims, args.batch_size)
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
            for dim in dims:
                a, b = encoded[name_a][dim][mask], encoded[name_b][dim][mask]
                s = paired_stats(a, b, args.resamples, rng)
                lines.append(
                    f"| {name_a} | {name_b} | {subset} ({mask.sum()}) | {dim} | {a.mean():.4f} | {b.mean():.4f} | {s['mean']:+.2f} | "
                    f"[{s['lo']:+.2f}, {s['hi']:+.2f}] | {s['se']:.2f} | {s['p']:.3f} |"
                )
    if args.ratio:
        low, high = min(dims), max(dims)
        lines += ["", f"| model | queries | dim{low} / dim{high} | 95 % interval |", "|---|---|---|---|"]
        for name in args.ratio:
            for subset, mask in subsets.items():
                r = ratio_stats(encoded[name][low][mask], encoded[name][high][mask], args.resamples, rng)
                lines.append(f"| {name} | {subset} ({mask.sum()}) | {r['ratio']:.1f} % | [{r['lo']:.1f}, {r['hi']:.1f}] % |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
