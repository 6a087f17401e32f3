"""Teacher scores, computed once: every (query, candidate) of a hard-negatives file scored by one or more teachers.

Score distillation trains a student to reproduce a stronger model's scores of a query's candidates: margin-MSE
matches the score margins positive - negative (Hofstätter et al. 2020, "Improving Efficient Neural Ranking Models
with Cross-Architecture Knowledge Distillation"), a KL loss matches the softmax over the candidate list (e.g.
RocketQAv2, Ren et al. 2021). The candidates are fixed (the mined file) and so are the teacher's scores, so running
the teacher (a cross-encoder costs several student steps per batch) once, ahead of training, is enough:
``python score.py`` (:func:`score`) writes the input file again with a ``"teacher_scores": {doc_id: score}`` field
per line, and training reads it (``data.train.hard_negatives=<that file>``): each pair then carries
``Example.teacher_scores = [its positive's score, each kept negative's score]``
(:mod:`embedlab.data.readers.hard_negatives`), stacked into ``batch["teacher_scores"]`` (B, 1 + n).

What is scored, per line: the query's positives (its qrels documents of grade >= ``min_score``, so every training
pair of the query finds its positive) and the line's ``negative_ids`` (all of them: training may take fewer).

Teachers (anything with ``score(task, lists, show_progress_bar) -> [float64 array per list]`` and ``models()``):

* :class:`CrossEncoderTeacher`: a trained cross-encoder folder; raw logits (no sigmoid: margins between confident
  scores survive, where sigmoid squashes them towards 0 or 1).
* :class:`BiEncoderTeacher`: a bi-encoder folder; cosine or dot product of query and document embeddings.
* :class:`BM25Teacher`: the BM25 score over the whole corpus's statistics (:meth:`BM25Retriever.score
  <embedlab.evaluation.first_stage.BM25Retriever.score>`).

Several teachers are fused: each teacher's scores are standardized per query list (mean 0, standard deviation 1
over that query's candidates) and summed with the weights (:func:`fuse_scores`). Their raw scales differ (a logit
in [-10, 10], a cosine in [-1, 1], BM25 in [0, 40]), so a raw sum would be the widest-ranging teacher alone; per
list, because BM25's range also differs from query to query (long queries score higher). One teacher's raw
scores are written as they are.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from torch import nn

from embedlab.atomic import atomic_file
from embedlab.data.errors import DataError
from embedlab.data.readers.hard_negatives import HardNegatives, read_hard_negatives
from embedlab.data.readers.tables import iter_jsonl
from embedlab.data.records import RetrievalTask
from embedlab.errors import ConfigError
from embedlab.evaluation.search import SIMILARITIES, prepare_embeddings

__all__ = [
    "BM25Teacher",
    "BiEncoderTeacher",
    "CandidateList",
    "CrossEncoderTeacher",
    "Teacher",
    "candidate_lists",
    "fuse_scores",
    "score",
    "score_lists",
    "standardize",
    "write_scored",
]

log = logging.getLogger(__name__)


@dataclass
class CandidateList:
    """One query's candidates to score: its positives (qrels order), then its mined negatives (file order)."""

    query_id: str
    doc_ids: list[str]


class Teacher(Protocol):
    """What :func:`score_lists` needs from a teacher."""

    def score(self, task: RetrievalTask, lists: Sequence[CandidateList], show_progress_bar: bool = True) -> list[np.ndarray]:
        """One float64 array ``(len(lists[i].doc_ids),)`` per list: the score of each candidate for the list's
        query (``task.queries`` / ``task.corpus`` texts), higher = more relevant."""
        ...

    def models(self) -> list[nn.Module]:
        """The neural models it holds (``[]`` for BM25), for the entry point to move to a device."""
        ...


def _split(flat: np.ndarray, lists: Sequence[CandidateList]) -> list[np.ndarray]:
    """Scores of all lists' candidates concatenated (P,) -> one float64 array per list."""
    if not lists:
        return []
    ends = np.cumsum([len(c.doc_ids) for c in lists])[:-1]
    return np.split(np.asarray(flat, dtype=np.float64), ends)


class CrossEncoderTeacher:
    """A trained cross-encoder's raw logit of every (query, candidate) pair.

    Args:
        path: a cross-encoder folder with a trained head or an embedlab ``.ckpt``
            (:meth:`CrossEncoder.from_pretrained <embedlab.models.CrossEncoder.from_pretrained>` with
            ``require_head=True``: a plain encoder folder would score with a random head).
        batch_size: pairs per forward pass (pairs are batched by token count, longest first).
        max_length: truncation length of a pair in tokens; ``None``: the folder's.
        torch_dtype: ``float32`` / ``bfloat16`` / ``float16``; ``None``: as the folder loads.
    """

    def __init__(self, path: str, batch_size: int = 32, max_length: int | None = None,
                 torch_dtype: str | None = None) -> None:
        from embedlab.models.cross_encoder import CrossEncoder

        _check_batch_size(batch_size, "cross_encoder")
        self.model = CrossEncoder.from_pretrained(path, max_length=max_length, require_head=True, torch_dtype=torch_dtype)
        if self.model.num_labels != 1:
            raise ConfigError(
                f"teachers.cross_encoder.path {path!r} has {self.model.num_labels} output labels; a teacher needs a "
                "relevance model with one logit per pair"
            )
        self.batch_size = batch_size

    def models(self) -> list[nn.Module]:
        return [self.model]

    def score(self, task: RetrievalTask, lists: Sequence[CandidateList], show_progress_bar: bool = True) -> list[np.ndarray]:
        pairs = [(task.queries[c.query_id], task.corpus[d]) for c in lists for d in c.doc_ids]
        logits = self.model.predict(pairs, batch_size=self.batch_size, apply_activation=False,
                                    show_progress_bar=show_progress_bar, desc="cross-encoder teacher")  # (P,)
        return _split(logits.numpy(), lists)


class BiEncoderTeacher:
    """A bi-encoder's similarity of every (query, candidate) pair.

    Each distinct query and candidate document is embedded once (:meth:`BiEncoder.encode
    <embedlab.models.BiEncoder.encode>`, with the model's query / document prompts and lengths); a pair scores
    the cosine (``cos``) or inner product (``dot``) of its two embeddings.

    Args:
        path: a bi-encoder folder, Hub id or ``.ckpt`` (:meth:`BiEncoder.from_pretrained
            <embedlab.models.BiEncoder.from_pretrained>`, every option as the folder says).
        batch_size: texts per forward pass.
        similarity: ``cos`` | ``dot``; ``None``: the model's own similarity.
        torch_dtype: ``float32`` / ``bfloat16`` / ``float16``; ``None``: as the folder loads.
        backend / onnx_threads: as :meth:`BiEncoder.from_pretrained <embedlab.models.BiEncoder.from_pretrained>`
            (``onnx_int8``: encode with the folder's int8 ONNX graph, docs/inference.md).
    """

    def __init__(self, path: str, batch_size: int = 64, similarity: str | None = None,
                 torch_dtype: str | None = None, backend: str = "torch", onnx_threads: int | None = None) -> None:
        from embedlab.models.bi_encoder import BiEncoder

        _check_batch_size(batch_size, "bi_encoder")
        if similarity is not None and similarity not in SIMILARITIES:
            raise ConfigError(
                f"teachers.bi_encoder.similarity must be one of {', '.join(SIMILARITIES)} or null, got {similarity!r}"
            )
        self.model = BiEncoder.from_pretrained(path, torch_dtype=torch_dtype, backend=backend, onnx_threads=onnx_threads)
        self.batch_size = batch_size
        self.similarity = similarity or self.model.similarity

    def models(self) -> list[nn.Module]:
        return [self.model]

    def score(self, task: RetrievalTask, lists: Sequence[CandidateList], show_progress_bar: bool = True) -> list[np.ndarray]:
        query_ids = list(dict.fromkeys(c.query_id for c in lists))  # distinct, first-seen order
        doc_ids = list(dict.fromkeys(d for c in lists for d in c.doc_ids))
        q_row = {q: i for i, q in enumerate(query_ids)}
        d_row = {d: i for i, d in enumerate(doc_ids)}
        queries = self.model.encode([task.queries[q] for q in query_ids], kind="query", batch_size=self.batch_size,
                                    show_progress_bar=show_progress_bar, desc="encode teacher queries")  # (Q, D)
        docs = self.model.encode([task.corpus[d] for d in doc_ids], kind="document", batch_size=self.batch_size,
                                 show_progress_bar=show_progress_bar, desc="encode teacher documents")  # (N, D)
        # float64 from here: fusion standardizes per list, which magnifies rounding when a list's scores are close
        queries = prepare_embeddings(queries.double(), self.similarity)
        docs = prepare_embeddings(docs.double(), self.similarity)
        return [(docs[[d_row[d] for d in c.doc_ids]] @ queries[q_row[c.query_id]]).numpy() for c in lists]  # (c,)


class BM25Teacher:
    """BM25 score of every (query, candidate) pair, over the whole corpus's statistics.

    Tokenization, index and scores are :class:`~embedlab.evaluation.first_stage.BM25Retriever`'s (the arguments
    mean what they mean there): a candidate it would retrieve gets the score it would give; a candidate sharing
    no token with the query scores 0. The corpus is indexed once per run.
    """

    def __init__(self, k1: float = 1.5, b: float = 0.75, method: str = "lucene",
                 stopwords: str | Sequence[str] | None = "en", stemmer: str | None = "english") -> None:
        from embedlab.evaluation.first_stage import BM25Retriever

        self.retriever = BM25Retriever(k1=k1, b=b, method=method, stopwords=stopwords, stemmer=stemmer,
                                       config_key="teachers.bm25")

    def models(self) -> list[nn.Module]:
        return []

    def score(self, task: RetrievalTask, lists: Sequence[CandidateList], show_progress_bar: bool = True) -> list[np.ndarray]:
        return self.retriever.score(task.corpus, [task.queries[c.query_id] for c in lists],
                                    [c.doc_ids for c in lists], show_progress_bar)


def _check_batch_size(batch_size: int, name: str) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"teachers.{name}.batch_size must be a positive integer, got {batch_size!r}")


# ----------------------------------------------------------------------------------------------------------------
# fusion
# ----------------------------------------------------------------------------------------------------------------
def standardize(x: np.ndarray) -> np.ndarray:
    """``(x - mean(x)) / std(x)`` in float64 (population std); all zeros when every value is equal (a list
    where the teacher sees no difference contributes nothing, rather than dividing by 0)."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0 or np.ptp(x) == 0:
        return np.zeros_like(x)
    return (x - x.mean()) / x.std()


def fuse_scores(scores: Mapping[str, Sequence[np.ndarray]], weights: Mapping[str, float]) -> list[np.ndarray]:
    """Fuse several teachers' scores of the same lists: ``sum_t weights[t] * standardize(scores[t][i])``.

    Args:
        scores: ``{teacher name: one array per list}``, every teacher over the same lists.
        weights: ``{teacher name: weight}`` for every name of ``scores``.

    Returns:
        one float64 array per list. A single teacher's scores come back as they are (float64), its weight unused:
        standardizing one teacher would only rescale its margins.
    """
    names = list(scores)
    if len(names) == 1:
        return [np.asarray(s, dtype=np.float64) for s in scores[names[0]]]
    count = len(scores[names[0]])
    return [sum(weights[t] * standardize(scores[t][i]) for t in names) for i in range(count)]


def check_weights(weights: Mapping[str, float], names: Sequence[str]) -> dict[str, float]:
    """``{name: weight}`` for the selected teachers: 1 when ``weights`` has no entry; finite, >= 0, not all 0."""
    out = {name: float(weights.get(name, 1.0)) for name in names}
    for name, w in out.items():
        if not math.isfinite(w) or w < 0:
            raise ConfigError(f"weights.{name} must be a finite number >= 0, got {w}")
    if len(out) > 1 and not any(out.values()):
        raise ConfigError(f"weights of the teachers {', '.join(names)} are all 0: give at least one a positive weight")
    return out


def score_lists(
    teachers: Mapping[str, Teacher],
    task: RetrievalTask,
    lists: Sequence[CandidateList],
    weights: Mapping[str, float] | None = None,
    show_progress_bar: bool = True,
) -> list[np.ndarray]:
    """Every teacher's scores of ``lists``, fused by :func:`fuse_scores` (one float64 array per list).

    ``weights``: ``{name: weight}``; a teacher without an entry (or ``weights=None``) weighs 1.
    """
    if not teachers:
        raise ConfigError("teacher must name at least one teacher")
    weights = check_weights(weights or {}, list(teachers))
    by_teacher = {}
    for name, teacher in teachers.items():
        log.info("scoring %d candidates of %d queries with teacher %s", sum(len(c.doc_ids) for c in lists),
                 len(lists), name)
        by_teacher[name] = teacher.score(task, lists, show_progress_bar)
    return fuse_scores(by_teacher, weights)


# ----------------------------------------------------------------------------------------------------------------
# the file
# ----------------------------------------------------------------------------------------------------------------
def candidate_lists(task: RetrievalTask, negatives: HardNegatives, min_score: int = 1) -> list[CandidateList]:
    """One :class:`CandidateList` per line of a hard-negatives file (file order): the query's qrels documents of
    grade >= ``min_score``, then its ``negative_ids`` not already listed.

    Raises:
        DataError: naming the file and line, for a query the task does not have, a query without a positive,
            or a document id the corpus does not have.
    """
    out = []
    for qid, negs in negatives.items():
        where = f"{negatives.path} line {negatives.line_numbers[qid]}"
        if qid not in task.queries:
            raise DataError(f"{where}: query_id {qid!r} is not a query of {task.name} with qrels in this split")
        positives = [d for d, s in task.qrels.get(qid, {}).items() if s >= min_score]
        if not positives:
            raise DataError(f"{where}: query {qid!r} has no qrels document with score >= {min_score} in {task.name}")
        doc_ids = list(dict.fromkeys([*positives, *negs]))
        unknown = [d for d in doc_ids if d not in task.corpus]
        if unknown:
            raise DataError(f"{where}: query {qid!r}: document ids not in the corpus: {unknown}")
        out.append(CandidateList(qid, doc_ids))
    return out


def write_scored(source: str | PathLike[str], lists: Sequence[CandidateList], scores: Sequence[np.ndarray],
                 out: str | PathLike[str]) -> Path:
    """The lines of the hard-negatives file ``source`` (every field kept, file order) with
    ``"teacher_scores": {doc_id: score}`` (the list's order: positives first) set on each, written to ``out``
    atomically (``out`` may be ``source`` itself)."""
    by_query = {c.query_id: dict(zip(c.doc_ids, s.tolist())) for c, s in zip(lists, scores)}
    lines = [obj for _, obj in iter_jsonl(Path(source))]  # read whole before writing: out may be source
    with atomic_file(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for obj in lines:
            obj["teacher_scores"] = by_query[str(obj["query_id"])]
            f.write(json.dumps(obj) + "\n")
    return Path(out)


def selected_teachers(selection: str | Sequence[str], available: Sequence[str]) -> list[str]:
    """The names ``teacher=`` selects (a name or a list of names), each an entry of ``teachers``, once."""
    names = [selection] if isinstance(selection, str) else [str(n) for n in selection]
    if not names:
        raise ConfigError(f"teacher must name at least one entry of teachers ({', '.join(available)}), got []")
    for name in names:
        if name not in available:
            raise ConfigError(f"teacher {name!r} is not an entry of teachers ({', '.join(available)})")
    if len(set(names)) < len(names):
        raise ConfigError(f"teacher names a teacher twice: {names}")
    return names


def score(cfg) -> tuple[dict[str, Any], dict[str, Any]]:
    """``python score.py``: score ``cfg.hard_negatives``'s lists over ``cfg.source`` with the teachers named by
    ``cfg.teacher`` (entries of ``cfg.teachers``), fused with ``cfg.weights``; write ``cfg.out``. Returns
    (summary, objects) like ``mine``."""
    from hydra.utils import instantiate  # Hydra only for the config entry point

    from embedlab.evaluating import resolve_device

    source_file = cfg.hard_negatives  # a missing value fails here, before anything loads
    names = selected_teachers(cfg.teacher, list(cfg.teachers))
    weights = check_weights(cfg.get("weights") or {}, names)  # before any model loads
    task = instantiate(cfg.source).task()
    negatives = read_hard_negatives(source_file)
    if negatives.teacher_scores is not None:
        log.warning("%s already has teacher_scores: they are replaced", source_file)
    lists = candidate_lists(task, negatives, cfg.min_score)
    if not lists:
        raise DataError(f"{source_file}: no line to score")
    device = resolve_device(cfg.get("device"))
    teachers = {name: instantiate(cfg.teachers[name]) for name in names}
    for teacher in teachers.values():
        for model in teacher.models():
            model.to(device)
    scores = score_lists(teachers, task, lists, weights, show_progress_bar=cfg.get("progress_bar", True))
    path = write_scored(source_file, lists, scores, cfg.out)
    summary = {"queries": len(lists), "pairs": sum(len(c.doc_ids) for c in lists), "teachers": names,
               "path": str(path)}
    log.info("scored %s", summary)
    return summary, {"task": task, "teachers": teachers, "lists": lists, "scores": scores}
