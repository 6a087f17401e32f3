"""Two-stage retrieval on a BEIR test split: dense, BM25 and hybrid first stages, each reranked by a cross-encoder at
several depths, with a paired bootstrap against the bi-encoder alone and the seen / unseen query split.

Each first stage retrieves once at the largest depth (timed); its runs are written as TREC files and read back
through ``RunFileRetriever`` (the ``retriever=run`` path), so every number below comes from the same
:class:`~embedlab.evaluation.rerank.RerankEvaluator` that ``evaluate.py ... rerank.model=CE`` runs. A (query,
document) pair is scored by the cross-encoder once, however many stages and depths list it: scores are cached on
disk (resumable; nothing lost on a crash) and the reranking time per query at depth k is k x the measured seconds
per pair (scoring time is linear in the pairs: the same batches, longest first).

    python benchmarks/two_stage_scifact.py --data-root ../shared/data --bi-encoder BI/model --cross-encoder CE/model \
        --top-k 10 20 50 100 200 --work-dir /tmp/two_stage --out benchmarks/results/two_stage_scifact
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from embedlab.atomic import atomic_write_text
from embedlab.data.readers import load_beir
from embedlab.evaluation.first_stage import BM25Retriever, DenseRetriever, HybridRetriever, RunFileRetriever
from embedlab.evaluation.metrics import per_query_metrics
from embedlab.evaluation.rerank import RerankEvaluator
from embedlab.evaluation.runs import write_trec_run
from embedlab.evaluation.significance import paired_stats, train_overlap_subsets
from embedlab.models import BiEncoder, CrossEncoder

K_VALUES = (1, 3, 5, 10, 100)


def first_stages(task, bi_encoder: str, depth: int, work: Path) -> tuple[dict[str, Path], dict[str, float]]:
    """Retrieve with dense, BM25 and hybrid (RRF of the two at depth max(k, 100), as ``retriever=hybrid``);
    write each run (and hybrid's at each needed depth) as TREC; return paths and seconds per run."""
    seconds, runs = {}, {}
    depth = max(depth, 100)  # hybrid fuses each retriever's top max(top_k, 100), as retriever=hybrid does
    start = time.perf_counter()
    runs["dense"] = DenseRetriever(BiEncoder.from_pretrained(bi_encoder).eval()).retrieve(task, depth)
    seconds["dense"] = time.perf_counter() - start
    start = time.perf_counter()
    runs["bm25"] = BM25Retriever().retrieve(task, depth)
    seconds["bm25"] = time.perf_counter() - start
    paths = {name: write_trec_run(run, work / f"first_stage_{name}.trec") for name, run in runs.items()}
    # retriever=hybrid itself, fed the two runs above instead of retrieving (and encoding the corpus) again
    hybrid = HybridRetriever({name: RunFileRetriever(paths[name]) for name in ("dense", "bm25")}, k=60)
    for hybrid_depth in sorted({depth, 100}):
        start = time.perf_counter()
        run = hybrid.retrieve(task, hybrid_depth, show_progress_bar=False)
        seconds[f"hybrid{hybrid_depth}"] = seconds["dense"] + seconds["bm25"] + time.perf_counter() - start
        paths[f"hybrid{hybrid_depth}"] = write_trec_run(run, work / f"first_stage_hybrid{hybrid_depth}.trec")
    return paths, seconds


def stage_file(stage: str, k: int) -> str:
    return f"hybrid{max(k, 100)}" if stage == "hybrid" else stage


class ScoreCache:
    """Cross-encoder scores of (query id, doc id) pairs, kept in a JSON file written atomically after each batch
    of new pairs, with the total scoring seconds (for seconds per pair)."""

    def __init__(self, path: Path, model: CrossEncoder, task, batch_size: int) -> None:
        self.path, self.model, self.task, self.batch_size = path, model, task, batch_size
        data = json.loads(path.read_text()) if path.is_file() else {"scores": {}, "seconds": 0.0, "pairs": 0}
        self.scores = {tuple(k.split("\t")): v for k, v in data["scores"].items()}
        self.seconds, self.pairs = data["seconds"], data["pairs"]

    def score(self, candidates: list[tuple[str, str]], chunk: int = 2048) -> None:
        todo = list(dict.fromkeys(c for c in candidates if c not in self.scores))
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            pairs = [(self.task.queries[q], self.task.corpus[d]) for q, d in part]
            began = time.perf_counter()
            values = self.model.predict(pairs, batch_size=self.batch_size, show_progress_bar=True, desc=f"score {start + len(part)}/{len(todo)}")
            self.seconds += time.perf_counter() - began
            self.pairs += len(part)
            self.scores.update(zip(part, values.tolist()))
            self.save()

    def save(self) -> None:
        data = {"scores": {f"{q}\t{d}": s for (q, d), s in self.scores.items()}, "seconds": self.seconds, "pairs": self.pairs}
        atomic_write_text(self.path, json.dumps(data))

    @property
    def seconds_per_pair(self) -> float:
        return self.seconds / max(self.pairs, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--dataset", default="scifact")
    parser.add_argument("--bi-encoder", required=True)
    parser.add_argument("--cross-encoder", required=True)
    parser.add_argument("--top-k", type=int, nargs="+", default=[10, 20, 50, 100, 200])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--resamples", type=int, default=10_000)
    parser.add_argument("--work-dir", required=True, help="run files and the score cache (not for the repository)")
    parser.add_argument("--out", default="benchmarks/results/two_stage_scifact", help="stem of the .md / .csv / .png")
    args = parser.parse_args()

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    folder = Path(args.data_root) / args.dataset
    task = load_beir(folder, split="test")
    subsets = train_overlap_subsets(task.qrels, load_beir(folder, split="train").qrels)
    depth = max(args.top_k)
    started = time.perf_counter()
    paths, stage_seconds = first_stages(task, args.bi_encoder, depth, work)
    model = CrossEncoder.from_pretrained(args.cross_encoder, require_head=True).eval()
    cache = ScoreCache(work / "scores.json", model, task, args.batch_size)

    stages = ("dense", "bm25", "hybrid")
    rows, per_query = [], {}
    bi_alone = None
    for k in sorted(args.top_k):  # shallow depths first: every depth scored is reported if a later one is stopped
        for stage in stages:
            name = stage_file(stage, k)
            evaluator = RerankEvaluator(task, RunFileRetriever(paths[name]), top_k=k, k_values=K_VALUES, batch_size=args.batch_size)
            evaluator.prepare(show_progress_bar=False)
            evaluator.first_stage_seconds = stage_seconds[name]
            cache.score(evaluator.candidates)
            scores = torch.tensor([cache.scores[c] for c in evaluator.candidates], dtype=torch.float64)
            metrics = evaluator.compute({"pairs": scores}, prefix="", rerank_seconds=cache.seconds_per_pair * len(evaluator.candidates))
            final = per_query_metrics(evaluator.last_runs["run"], task.qrels, k_values=(10,))
            first = per_query_metrics(evaluator.last_runs["first_stage"], task.qrels, k_values=(10,))
            per_query[(stage, k)] = np.array([final[q]["ndcg@10"] for q in task.qrels])
            if stage == "dense" and k == min(max(args.top_k), 100):  # the bi-encoder alone: its top 100 (or less)
                bi_alone = np.array([first[q]["ndcg@10"] for q in task.qrels])
                write_trec_run(evaluator.last_runs["run"], work / "dense_top100_reranked.trec")
            rows.append({"first_stage": stage, "top_k": k, **{m: metrics[m] for m in sorted(metrics)}})
            print(f"{stage:>6} k={k:<4} nDCG@10 {metrics['ndcg@10']:.4f} (first stage {metrics['first_stage/ndcg@10']:.4f})", flush=True)
    wall = time.perf_counter() - started

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, stages, out.with_suffix(".png"))
    atomic_write_text(out.with_suffix(".md"), report(args, rows, per_query, bi_alone, subsets, stage_seconds, cache, wall, len(task.qrels)))
    print(f"wrote {out.with_suffix('.md')}")


def plot(rows: list[dict], stages, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    twin = ax.twinx()
    for stage, color in zip(stages, ("tab:blue", "tab:orange", "tab:green")):
        mine = sorted((r for r in rows if r["first_stage"] == stage), key=lambda r: r["top_k"])
        ks = [r["top_k"] for r in mine]
        ax.plot(ks, [100 * r["ndcg@10"] for r in mine], "o-", color=color, label=f"{stage} -> cross-encoder")
        ax.axhline(100 * mine[0]["first_stage/ndcg@10"], color=color, linestyle=":", linewidth=1)
        twin.plot(ks, [r["rerank/seconds_per_query"] for r in mine], "s--", color=color, alpha=0.4)
    ax.set_xscale("log")
    ax.set_xticks([r["top_k"] for r in rows if r["first_stage"] == stages[0]])
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("rerank.top_k (candidates per query)")
    ax.set_ylabel("nDCG@10 of the final list (dotted: first stage alone)")
    twin.set_ylabel("reranking seconds per query (dashed)")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("SciFact test: reranking depth")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(args, rows, per_query, bi_alone, subsets, stage_seconds, cache, wall, n_queries) -> str:
    lines = [
        "# Two-stage retrieval on SciFact test: first stages reranked by a cross-encoder",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads, fp32. {n_queries} test queries. Wall time {wall / 60:.1f} min "
        f"({cache.pairs} pairs scored in this and earlier runs of the cache, {cache.seconds_per_pair * 1000:.1f} ms per pair).",
        "",
        "```",
        "python benchmarks/two_stage_scifact.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items()
        ),
        "```",
        "",
        f"Bi-encoder: `{args.bi_encoder}`; cross-encoder: `{args.cross_encoder}`. First-stage seconds (all queries): "
        + ", ".join(f"{k} {v:.1f}" for k, v in stage_seconds.items()) + ". Reranking seconds per query = top_k x the "
        "measured seconds per pair.",
        "",
        "| first stage | top_k | nDCG@10 | first stage nDCG@10 | MAP@100 | MRR@10 | first stage Recall@min(top_k, 100): the ceiling | rerank s/query |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['first_stage']} | {r['top_k']} | **{r['ndcg@10']:.4f}** | {r['first_stage/ndcg@10']:.4f} | {r['map@100']:.4f} | "
            f"{r['mrr@10']:.4f} | {r['first_stage/recall@100']:.4f} | {r['rerank/seconds_per_query']:.2f} |"
        )
    if bi_alone is not None:
        rng = np.random.default_rng(0)
        lines += [
            "",
            "## Against the bi-encoder alone (dense, not reranked): nDCG@10 points, paired over queries",
            "",
            "Bootstrap 95 % interval over queries, sign-flip permutation p. `seen`: at least one relevant document is a "
            "training positive; `unseen`: none is (reranker and bi-encoder were both trained on SciFact train).",
            "",
            "| system | subset | queries | bi-encoder | system | difference [95 % CI] | p |",
            "|---|---|---|---|---|---|---|",
        ]
        paired_k = min(max(args.top_k), 100)
        for (stage, k), values in sorted(per_query.items(), key=lambda x: (x[0][1], x[0][0])):
            if k != paired_k:
                continue
            for subset in ("all", "seen", "unseen"):
                mask = subsets[subset]
                s = paired_stats(values[mask], bi_alone[mask], args.resamples, rng)
                lines.append(
                    f"| {stage} -> CE (top {k}) | {subset} | {int(mask.sum())} | {bi_alone[mask].mean():.4f} | "
                    f"{values[mask].mean():.4f} | {s['mean']:+.2f} [{s['lo']:+.2f}, {s['hi']:+.2f}] | {s['p']:.4f} |"
                )
    lines += ["", f"Plot: [{Path(args.out).name}.png]({Path(args.out).name}.png); every row: [{Path(args.out).name}.csv]({Path(args.out).name}.csv).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
