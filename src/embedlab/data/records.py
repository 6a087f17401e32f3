"""The records every embedlab dataset yields.

One training record type carries everything later objectives need (hard negatives, teacher scores, ids
for false-negative masking), so new losses plug in without a new data layer.

A text is named by its id when the data gives one, else by a hash of the text (:func:`example_ids`,
:func:`text_id`); batching, the no-duplicates sampler and evaluation tasks built from pairs all use that
one rule, so they agree on which texts are the same.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import NamedTuple


@dataclass
class Example:
    """One training example.

    - pairs (query, positive): in-batch-negative losses (mnrl); ``negatives`` adds hard negatives.
    - triplets: ``query``/``positive``/``negatives[0]`` (triplet loss).
    - scored pairs: ``query`` = text 1, ``positive`` = text 2, ``score`` in [0, 1] (cosent, cosine) or a
      0/1 label (contrastive).
    - ids (``query_id``, ``positive_id``, ``negative_ids``) identify texts for masking and mining;
      ``teacher_scores`` (one per candidate: positive first, then negatives) feed distillation.
    - unlabelled texts (embedding distillation, :class:`~embedlab.data.texts.TextCollection`): a query alone is
      ``Example(query=text, positive=None)``, a document alone ``Example(query=None, positive=text)``.
    - ``known_positive_ids``: ids of every document known to be relevant to the query (its qrels), so
      in-batch-negative losses can mask them when they turn up as another query's candidate. Derived
      metadata, left out of ``==`` (two examples with the same texts, ids and scores are equal).
    """

    query: str | None
    positive: str | None
    negatives: list[str] = field(default_factory=list)
    score: float | None = None
    query_id: str | None = None
    positive_id: str | None = None
    negative_ids: list[str] = field(default_factory=list)
    teacher_scores: list[float] | None = None
    known_positive_ids: list[str] = field(default_factory=list, compare=False)


def text_id(text: str) -> str:
    """Stable id of a text that has none: the same text gets the same id in every process and run.

    ``"h:"`` + 16 hex digits of BLAKE2b (Python's ``hash`` is salted per process, so ranks would
    disagree). The prefix keeps hashed ids apart from dataset ids such as BEIR's ``"1"``.
    """
    return "h:" + hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


class ExampleIds(NamedTuple):
    """The ids of one example's texts: ``query``, ``positive`` and one per hard negative, in order."""

    query: str | None
    positive: str | None
    negatives: list[str]


def example_ids(example: Example) -> ExampleIds:
    """Each text's id: the example's own id when it has one, else :func:`text_id` of the text.

    The one rule for naming a text, shared by batching (ids for false-negative masking), the
    no-duplicates sampler and the evaluation tasks built from pairs, so the same text has the same id in
    all three. An empty id counts as missing; ``negative_ids`` may be shorter than ``negatives`` (the
    negatives without an id are hashed).
    """
    ids = example.negative_ids
    return ExampleIds(
        query=example.query_id or text_id(example.query),
        positive=example.positive_id or text_id(example.positive),
        negatives=[
            ids[j] if j < len(ids) and ids[j] else text_id(text) for j, text in enumerate(example.negatives)
        ],
    )


@dataclass
class RetrievalTask:
    """A BEIR-style retrieval evaluation set: corpus and queries by id, graded qrels ``{qid: {doc_id: rel}}``."""

    corpus: dict[str, str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    name: str = "retrieval"


@dataclass
class STSTask:
    """Scored sentence pairs for Spearman correlation of cosine similarity with gold ``scores``."""

    sentences1: list[str]
    sentences2: list[str]
    scores: list[float]
    name: str = "sts"
