"""A distilled student against its teacher: quality on SciFact and STSb along the distillation steps, and speed.

Quality: STSb test Spearman (cosine) of the teacher, the student's starting point (the layer-reduced copy before
distillation), every checkpoint of the run's ``checkpoints/curve/`` folder (``experiment=distill_minilm_l3`` saves
one every 50 steps) and the final student; SciFact test nDCG@10 (all queries, and the ``unseen`` ones none of whose
relevant documents is a training positive) of the teacher, the starting point, the final student and the
checkpoints at ``--scifact-steps`` (a SciFact evaluation costs minutes on a CPU, STSb seconds). A test run file
(``--teacher-run``, the run's own ``runs/test_run.trec``) is read instead of encoding again. The run's validation
history (SciFact training queries' nDCG@10 at each epoch end) is listed too.

Speed: encoding throughput of teacher and student on the same texts (SciFact test queries + the first
``--speed-docs`` corpus documents), alternated ``--repeats`` times in this one process; the ratio is student /
teacher texts per second.

    nice python benchmarks/distill_student.py --run RUN_DIR --teacher TEACHER_FOLDER --data-root ../shared/data \
        --reference ../shared/models/paraphrase-MiniLM-L3-v2 --out benchmarks/results/distill_student.md
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import re
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from embedlab.atomic import atomic_write_text
from embedlab.data import BeirSource, STSSource
from embedlab.evaluation.evaluators import RetrievalEvaluator, STSEvaluator
from embedlab.evaluation.metrics import per_query_metrics
from embedlab.evaluation.runs import read_run
from embedlab.evaluation.significance import train_overlap_subsets
from embedlab.models import BiEncoder, layer_reduced


def scifact_quality(run, scifact, train_qrels) -> dict[str, float]:
    """nDCG@10 on all test queries and the unseen ones, Recall@100, from a ranking ``{query: {doc: score}}``."""
    per_query = per_query_metrics(run, scifact.qrels, k_values=(10, 100))
    ids = sorted(scifact.qrels)
    ndcg = np.array([per_query[q]["ndcg@10"] for q in ids])
    subsets = train_overlap_subsets({q: scifact.qrels[q] for q in ids}, train_qrels)
    return {
        "scifact_ndcg@10": float(ndcg.mean()),
        "scifact_unseen_ndcg@10": float(ndcg[subsets["unseen"]].mean()),
        "scifact_recall@100": float(np.mean([per_query[q]["recall@100"] for q in ids])),
    }


def scifact_run(model: BiEncoder, scifact, batch_size: int):
    evaluator = RetrievalEvaluator(scifact, k_values=(10, 100), batch_size=batch_size)
    evaluator.evaluate(model, prefix="", show_progress_bar=True)
    return evaluator.last_runs["run"]


def sts_quality(model: BiEncoder, sts, batch_size: int) -> float:
    return STSEvaluator(sts, batch_size=batch_size).evaluate(model, prefix="", show_progress_bar=False)["spearman_cosine"]


def throughput(models: dict[str, BiEncoder], texts: list[tuple[str, list[str]]], batch_size: int, repeats: int) -> dict[str, list[float]]:
    """Texts per second of each model over ``texts`` ([(kind, texts)]), models alternated in each repeat."""
    total = sum(len(t) for _, t in texts)
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            for kind, batch in texts:
                model.encode(batch, kind=kind, batch_size=batch_size)
            seconds[name].append(time.perf_counter() - start)
    return {name: [total / s for s in values] for name, values in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", required=True, help="the distillation run folder (model/, runs/, checkpoints/curve/)")
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--teacher-run", default=None, help="the teacher's SciFact test run file (else encoded here)")
    parser.add_argument("--layers", default="0,2,4", help="the student's kept teacher layers (its step-0 copy)")
    parser.add_argument("--scifact-steps", default="0", help="checkpoint steps also evaluated on SciFact test")
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--speed-docs", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quality-from", default=None, help="a CSV this script wrote: reuse its rows (by model label)")
    parser.add_argument("--skip-speed", action="store_true", help="quality only (e.g. before the run has finished)")
    parser.add_argument("--out", default="benchmarks/results/distill_student.md")
    args = parser.parse_args()
    torch.manual_seed(0)

    run = Path(args.run)
    scifact = BeirSource(f"{args.data_root}/scifact", split="test").task()
    train_qrels = BeirSource(f"{args.data_root}/scifact", split="train").task().qrels
    sts = STSSource(f"{args.data_root}/stsbenchmark/sts-test.csv").task()
    layers = [int(x) for x in args.layers.split(",")]
    scifact_steps = {int(x) for x in args.scifact_steps.split(",") if x}

    def step_of(path: Path) -> int:
        return int(re.search(r"(\d+)", path.stem).group(1))

    # (label, step, build, SciFact test run file or None: encode when the step asks for it)
    models = [
        ("teacher", None, lambda: BiEncoder.from_pretrained(args.teacher), args.teacher_run or "encode"),
        ("student, step 0 (layer-reduced copy)", 0, lambda: layer_reduced(args.teacher, layers), "encode" if 0 in scifact_steps else None),
    ]
    for ckpt in sorted((run / "checkpoints" / "curve").glob("*.ckpt"), key=step_of):
        step = step_of(ckpt)
        models.append((f"student, step {step}", step, lambda c=ckpt: BiEncoder.from_pretrained(str(c)), "encode" if step in scifact_steps else None))
    final_run = run / "runs" / "test_run.trec"
    if (run / "model").is_dir():
        models.append(("student, final", None, lambda: BiEncoder.from_pretrained(str(run / "model")), str(final_run)))

    known = {r["model"]: r for r in _read_rows(args.quality_from)} if args.quality_from else {}
    rows = []
    for label, step, build, scifact_source in models:
        if label in known:
            rows.append(known[label])
            continue
        start = time.perf_counter()
        model = build().eval()
        row = {"model": label, "step": "" if step is None else step, "stsb_spearman": sts_quality(model, sts, args.batch_size)}
        if scifact_source == "encode":
            row.update(scifact_quality(scifact_run(model, scifact, args.batch_size), scifact, train_qrels))
        elif scifact_source is not None:
            row.update(scifact_quality(read_run(scifact_source, scifact), scifact, train_qrels))
        rows.append(row)
        print(f"{label}: {row} ({time.perf_counter() - start:.0f} s)", flush=True)

    history = _validation_history(run)
    out = Path(args.out)
    fields = ["model", "step", "scifact_ndcg@10", "scifact_unseen_ndcg@10", "scifact_recall@100", "stsb_spearman"]
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    if args.skip_speed:
        return
    teacher, student = BiEncoder.from_pretrained(args.teacher).eval(), BiEncoder.from_pretrained(str(run / "model")).eval()
    texts = [("query", list(scifact.queries.values())), ("document", list(scifact.corpus.values())[: args.speed_docs])]
    speed = throughput({"teacher": teacher, "student": student}, texts, args.batch_size, args.repeats)
    ratio = [s / t for s, t in zip(speed["student"], speed["teacher"])]

    _plot([r for r in rows if r["step"] != ""], rows[0], history, out.with_suffix(".png"))
    t_row = rows[0]

    def cell(r, key, digits, pct=False):
        if key not in r:
            return "", ""
        return f"{r[key]:.{digits}f}", f"{100 * r[key] / t_row[key]:.1f}" if pct else ""

    lines = [
        "# Embedding distillation: a 3-layer student of all-MiniLM-L6-v2",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} (fp32, one process).",
        f"Run: `{run}`; teacher `{args.teacher}`; student layers {layers}.",
        "",
        "Commands:",
        "",
        "    python train.py experiment=distill_minilm_l3 hydra.run.dir=RUN_DIR",
        f"    python benchmarks/distill_student.py --run RUN_DIR --teacher TEACHER --teacher-run TEACHER_TEST_RUN --scifact-steps {args.scifact_steps} --out {args.out}",
        "",
        "## Quality on the test splits",
        "",
        "SciFact unseen: the test queries none of whose relevant documents is a SciFact training positive. Empty cells:",
        "not evaluated on SciFact (minutes per checkpoint here).",
        "",
        "| model | step | SciFact nDCG@10 | % of teacher | unseen nDCG@10 | R@100 | STSb Spearman | % of teacher |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        nd, nd_pct = cell(r, "scifact_ndcg@10", 4, pct=True)
        un, _ = cell(r, "scifact_unseen_ndcg@10", 4)
        rc, _ = cell(r, "scifact_recall@100", 4)
        sp, sp_pct = cell(r, "stsb_spearman", 2, pct=True)
        lines.append(f"| {r['model']} | {r['step']} | {nd} | {nd_pct} | {un} | {rc} | {sp} | {sp_pct} |")
    if history:
        lines += ["", "Validation during the run (SciFact *training* queries, nDCG@10):", "",
                  "| step | epoch | val nDCG@10 |", "|---|---|---|",
                  *(f"| {int(h['step'])} | {int(h['epoch'])} | {h['val/ndcg@10']:.4f} |" for h in history)]  # fmt: skip
    lines += [
        "",
        f"Curve: `{out.with_suffix('.png').name}`; rows: `{out.with_suffix('.csv').name}`.",
        "",
        f"## Encoding throughput (SciFact test queries + {args.speed_docs} corpus documents, "
        f"{sum(len(t) for _, t in texts)} texts, batch {args.batch_size}, {args.repeats} alternated repeats)",
        "",
        "| model | texts/s (each repeat) | median |",
        "|---|---|---|",
        *(f"| {name} | {', '.join(f'{v:.1f}' for v in values)} | {statistics.median(values):.1f} |" for name, values in speed.items()),
        "",
        f"Student / teacher: {', '.join(f'{r:.2f}x' for r in ratio)} (median **{statistics.median(ratio):.2f}x**).",
    ]
    atomic_write_text(out, "\n".join(lines) + "\n")
    print("\n".join(lines))


def _read_rows(path: str) -> list[dict]:
    with open(path) as f:
        return [
            {k: (v if k == "model" or v == "" else int(v) if k == "step" else float(v)) for k, v in r.items() if v != "" or k == "step"}
            for r in csv.DictReader(f)
        ]


def _validation_history(run: Path) -> list[dict[str, float]]:
    """The run's validations (step, epoch, val/ndcg@10) from its CSV log, when it has one."""
    path = run / "csv" / "metrics.csv"
    if not path.is_file():
        return []
    with open(path) as f:
        return [
            {"step": float(r["step"]), "epoch": float(r["epoch"]), "val/ndcg@10": float(r["val/ndcg@10"])}
            for r in csv.DictReader(f) if r.get("val/ndcg@10")
        ]


def _plot(curve: list[dict], teacher: dict, history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    sts = [r for r in curve if "stsb_spearman" in r]
    axes[0].plot([r["step"] for r in sts], [r["stsb_spearman"] for r in sts], marker="o", label="student")
    axes[0].axhline(teacher["stsb_spearman"], color="gray", linestyle="--", label="teacher")
    axes[0].axhline(0.97 * teacher["stsb_spearman"], color="gray", linestyle=":", label="97% of teacher")
    axes[0].set_title("STSb test Spearman")
    sci = [r for r in curve if "scifact_ndcg@10" in r]
    axes[1].plot([r["step"] for r in sci], [r["scifact_ndcg@10"] for r in sci], marker="o", label="student, test")
    if history:
        axes[1].plot([h["step"] for h in history], [h["val/ndcg@10"] for h in history], marker="s", label="student, val (train queries)")
    axes[1].axhline(teacher["scifact_ndcg@10"], color="gray", linestyle="--", label="teacher, test")
    axes[1].axhline(0.97 * teacher["scifact_ndcg@10"], color="gray", linestyle=":", label="97% of teacher")
    axes[1].set_title("SciFact nDCG@10")
    for ax in axes:
        ax.set_xlabel("distillation steps")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
