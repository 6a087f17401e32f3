"""The records every embedlab dataset yields.

One training record type carries everything later objectives need (hard negatives, teacher scores, ids
for false-negative masking), so new losses plug in without a new data layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Example:
    """One training example.

    - pairs (query, positive): in-batch-negative losses (mnrl); ``negatives`` adds hard negatives.
    - triplets: ``query``/``positive``/``negatives[0]`` (triplet loss).
    - scored pairs: ``query`` = text 1, ``positive`` = text 2, ``score`` in [0, 1] (cosent, cosine) or a
      0/1 label (contrastive).
    - ids (``query_id``, ``positive_id``, ``negative_ids``) identify texts for masking and mining;
      ``teacher_scores`` (one per candidate: positive first, then negatives) feed distillation.
    - ``known_positive_ids``: ids of every document known to be relevant to the query (its qrels), so
      in-batch-negative losses can mask them when they turn up as another query's candidate. Derived
      metadata, left out of ``==`` (two examples with the same texts, ids and scores are equal).
    """

    query: str
    positive: str
    negatives: list[str] = field(default_factory=list)
    score: float | None = None
    query_id: str | None = None
    positive_id: str | None = None
    negative_ids: list[str] = field(default_factory=list)
    teacher_scores: list[float] | None = None
    known_positive_ids: list[str] = field(default_factory=list, compare=False)


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
