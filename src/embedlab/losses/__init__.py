"""Losses: pure functions of one batch's embeddings (:class:`EmbeddedBatch`, bi-encoders) or candidate scores
(:class:`ScoredCandidates`, cross-encoders) returning named terms.

Every loss returns a dict whose ``"loss"`` entry is optimized; the other entries are logged as
``train/<term>``.
"""

from embedlab.losses.base import EmbeddedBatch, pairwise_similarity, similarity_matrix
from embedlab.losses.contrastive import ContrastiveLoss, MultipleNegativesRankingLoss, TripletLoss
from embedlab.losses.distillation import DistillationLoss, EmbeddingMSELoss, KLDivergenceLoss
from embedlab.losses.matryoshka import MatryoshkaLoss
from embedlab.losses.ranking import (
    BinaryCrossEntropyLoss,
    LambdaLoss,
    ListwiseSoftmaxLoss,
    MarginMSELoss,
    RankNetLoss,
    ScoredCandidates,
)
from embedlab.losses.scored import CoSENTLoss, CosineSimilarityLoss

__all__ = [
    "BinaryCrossEntropyLoss",
    "CoSENTLoss",
    "ContrastiveLoss",
    "CosineSimilarityLoss",
    "DistillationLoss",
    "EmbeddingMSELoss",
    "KLDivergenceLoss",
    "EmbeddedBatch",
    "LambdaLoss",
    "ListwiseSoftmaxLoss",
    "MarginMSELoss",
    "MatryoshkaLoss",
    "MultipleNegativesRankingLoss",
    "RankNetLoss",
    "ScoredCandidates",
    "TripletLoss",
    "pairwise_similarity",
    "similarity_matrix",
]
