"""Cross-encoder scoring throughput: embedlab's CrossEncoder.predict vs sentence-transformers' CrossEncoder.predict.

Same saved cross-encoder folder, same SciFact test (query, document) pairs, same batch size, same process,
same torch thread count; a warm-up for each, then ``--repeats`` timed runs alternating which goes first.
The pairs are deterministic: pair i is test query ``i mod Q`` (queries in file order) with corpus document
``i mod D`` (corpus in file order), so most documents are long enough to be truncated at max_length.
Writes a markdown report (machine, command, pairs/second of both, the ratio, the largest score difference).

    python benchmarks/cross_encoder_throughput.py --model runs/.../model --data-root ../shared/data \\
        --out benchmarks/results/cross_encoder_throughput.md
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from embedlab.data import BeirSource
from embedlab.models import CrossEncoder


def scifact_pairs(data_root: str, count: int) -> list[tuple[str, str]]:
    """``count`` (query, document) pairs: test query i mod Q with corpus document i mod D (file order)."""
    task = BeirSource(str(Path(data_root) / "scifact"), split="test").task()
    qids = [q for q in task.queries if q in task.qrels]
    doc_ids = list(task.corpus)
    return [(task.queries[qids[i % len(qids)]], task.corpus[doc_ids[i % len(doc_ids)]]) for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a saved cross-encoder folder (both libraries load it)")
    parser.add_argument("--data-root", default=os.environ.get("EMBEDLAB_DATA", "../shared/data"))
    parser.add_argument("--num-pairs", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--out", default="benchmarks/results/cross_encoder_throughput.md")
    args = parser.parse_args()

    from sentence_transformers import CrossEncoder as STCrossEncoder

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    pairs = scifact_pairs(args.data_root, args.num_pairs)
    ours = CrossEncoder.from_pretrained(args.model)
    st = STCrossEncoder(args.model, device="cpu")
    if st.max_seq_length != ours.max_length:
        sys.exit(f"max_length differs: embedlab {ours.max_length}, sentence-transformers {st.max_seq_length}")

    def run_embedlab(items):
        return ours.predict(items, batch_size=args.batch_size)

    def run_st(items):
        return torch.from_numpy(st.predict(items, batch_size=args.batch_size, show_progress_bar=False)).float()

    runners = {"embedlab": run_embedlab, "sentence-transformers": run_st}
    warmup = pairs[: 2 * args.batch_size]
    for run in runners.values():
        run(warmup)
    times: dict[str, list[float]] = {name: [] for name in runners}
    scores: dict[str, torch.Tensor] = {}
    for i in range(args.repeats):
        names = list(runners) if i % 2 == 0 else list(reversed(runners))  # alternate who goes first
        for name in names:
            start = time.perf_counter()
            scores[name] = runners[name](pairs)
            times[name].append(time.perf_counter() - start)

    rate = {name: len(pairs) / min(t) for name, t in times.items()}
    ratio = rate["embedlab"] / rate["sentence-transformers"]
    diff = (scores["embedlab"] - scores["sentence-transformers"]).abs().max().item()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    lines = [
        f"# Cross-encoder scoring throughput: {Path(args.model).name}",
        "",
        f"- machine: {platform.processor() or platform.machine()} ({platform.system()} {platform.release()}), "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), device cpu",
        f"- command: `{command}`",
        f"- model: `{args.model}` ({ours.num_labels} label(s), max_length {ours.max_length}, activation {ours.activation})",
        f"- data: {len(pairs)} SciFact test pairs (query i mod Q with corpus document i mod D, file order); "
        f"batch size {args.batch_size}",
        f"- both: same folder, same process, one warm-up call each ({len(warmup)} pairs), then {args.repeats} timed "
        "runs alternating which goes first (embedlab first on even repeats); best run reported",
        "",
        "| scorer | seconds (each run) | pairs / second (best) |",
        "|---|---|---|",
    ]
    for name, t in times.items():
        lines.append(f"| {name} | {', '.join(f'{x:.2f}' for x in t)} | {rate[name]:.1f} |")
    lines += [
        "",
        f"**throughput ratio (embedlab / sentence-transformers): {ratio:.2f}x**",
        "",
        f"largest absolute score difference between the two: {diff:.2e}",
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
