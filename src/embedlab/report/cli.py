"""``python report.py SWEEP_DIR``: a sweep folder's results table (see :mod:`embedlab.report`)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from embedlab.errors import UserError

log = logging.getLogger("embedlab.report")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="report.py",
        description="Results table of a sweep folder (python train.py -m ...): mean ± std and n per configuration, "
        "paired tests against a baseline, Markdown / LaTeX / CSV / PNG and a W&B summary run. Nothing is re-run.",
    )
    p.add_argument("sweep_dir", help="the multirun folder (hydra.sweep.dir) or a folder of run folders")
    p.add_argument("--metrics", help="comma-separated metrics.json keys (default: test/ndcg@10, test/recall@100, "
                   "test/spearman_* where present)")
    p.add_argument("--by", help="comma-separated override keys that make a row (default: every swept key but seed)")
    p.add_argument("--baseline", help="the row the others are tested against, e.g. 'loss=mnrl,pooling=mean'")
    p.add_argument("--units", help="a file of query (or pair) ids, one per line: restrict every number to them, "
                   "recomputed from the per-query files")
    p.add_argument("--out", help="output folder (default: SWEEP_DIR/report)")
    p.add_argument("--title", default="", help="table title / LaTeX caption")
    p.add_argument("--resamples", type=int, default=10_000, help="bootstrap and permutation resamples (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the resampling (default 0)")
    p.add_argument("--no-wandb", action="store_true", help="do not write the W&B summary run")
    p.add_argument("--wandb-project", help="W&B project (default: the jobs' logger.wandb.project, else embedlab)")
    return p


def _split(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def run(argv: list[str] | None = None) -> dict[str, Path]:
    """Parse ``argv``, build the table, write every format; returns the files written (``wandb``: the run folder)."""
    from embedlab.report import build_report

    args = parser().parse_args(argv)
    return build_report(
        args.sweep_dir, metrics=_split(args.metrics), by=_split(args.by), baseline=args.baseline,
        out_dir=args.out, title=args.title, resamples=args.resamples, seed=args.seed, wandb=not args.no_wandb,
        wandb_project=args.wandb_project, units=read_units(args.units) if args.units else None,
    )


def read_units(path: str) -> set[str]:
    """Ids of a ``--units`` file (one per line, blank lines and ``#`` comments skipped)."""
    from embedlab.report.sweep import SweepError

    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise SweepError(f"--units {path}: {err.strerror}") from None
    units = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    if not units:
        raise SweepError(f"--units {path}: no id in the file")
    return units


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        files = run(argv)
    except UserError as err:
        from embedlab.cli import exit_with_error

        exit_with_error(err)
    for kind, path in files.items():
        print(f"{kind}: {path}", file=sys.stderr)
    print(Path(files["md"]).read_text())
