"""Readers that turn dataset files into embedlab records, one module per kind of input.

- :mod:`~embedlab.data.readers.beir`: BEIR retrieval folders (``corpus.jsonl``, ``queries.jsonl``,
  ``qrels/<split>.tsv``) as evaluation tasks and (query, relevant document) training pairs, and the
  download of a BEIR dataset.
- :mod:`~embedlab.data.readers.hard_negatives`: files of mined hard negatives (``python mine.py``) and
  attaching them to training pairs.
- :mod:`~embedlab.data.readers.sts`: the STS Benchmark release files, and the rule every score follows
  (divided by ``score_scale`` into [0, 1]).
- :mod:`~embedlab.data.readers.tables`: generic tables (JSONL, JSON, CSV, TSV, Parquet or a Hugging
  Face dataset) of pairs, triplets or scored pairs, with configurable column names.
- :mod:`~embedlab.data.readers.splits`: a seeded validation split carved out of datasets that ship
  without one.

What they share is the error contract: every problem with the input is raised as
:class:`~embedlab.data.errors.DataError` naming the full file path, the 1-based line (text formats) or
row (JSON arrays, Parquet, Hub datasets) and the field, so the message alone says what to fix. Local
files are parsed with ``json``/``csv``/``pyarrow`` directly rather than through ``datasets`` precisely to
keep those line numbers.

The public functions are importable from this package (``from embedlab.data.readers import load_beir``).
"""

from embedlab.data.readers.beir import BEIR_URL, beir_download, beir_task_pairs, beir_training_pairs, load_beir
from embedlab.data.readers.hard_negatives import attach_hard_negatives, read_hard_negatives
from embedlab.data.readers.splits import carve_split
from embedlab.data.readers.sts import load_sts, sts_training_pairs
from embedlab.data.readers.tables import load_examples, load_table

__all__ = [
    "BEIR_URL",
    "attach_hard_negatives",
    "beir_download",
    "beir_task_pairs",
    "beir_training_pairs",
    "carve_split",
    "load_beir",
    "load_examples",
    "load_sts",
    "load_table",
    "read_hard_negatives",
    "sts_training_pairs",
]
