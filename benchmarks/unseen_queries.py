"""The ids of a BEIR test set's queries none of whose relevant documents is a training positive, one per line:
the ``--units`` file of ``report.py`` (every number of the table recomputed on those queries alone).

On SciFact most relevant test documents are also relevant to a training query, so a model trained on its train
split can score on those queries by remembering training positives; the "unseen" queries show what is left.

    python benchmarks/unseen_queries.py --data ../shared/data/scifact --out /tmp/scifact_unseen.txt
    python report.py SWEEP_DIR --units /tmp/scifact_unseen.txt --out SWEEP_DIR/report_unseen
"""

from __future__ import annotations

import argparse
from pathlib import Path

from embedlab.atomic import atomic_write_text
from embedlab.data import BeirSource
from embedlab.evaluation.significance import train_overlap_subsets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/scifact", help="a BEIR folder with qrels/train.tsv and qrels/test.tsv")
    parser.add_argument("--subset", default="unseen", choices=("unseen", "seen"))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    test = BeirSource(args.data, split="test").task().qrels
    train = BeirSource(args.data, split="train").task().qrels
    mask = train_overlap_subsets(test, train)[args.subset]
    ids = [q for q, keep in zip(test, mask) if keep]
    atomic_write_text(Path(args.out), f"# {args.subset} test queries of {args.data} ({len(ids)} of {len(test)})\n" + "".join(f"{q}\n" for q in ids))
    print(f"{len(ids)} of {len(test)} test queries -> {args.out}")


if __name__ == "__main__":
    main()
