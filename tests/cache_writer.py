"""The writer process of tests/test_cache.py's concurrency check, in a module of its own so that a spawned child
imports only the cache and the tiny model (not Lightning, nor the test module's fixtures)."""

from __future__ import annotations

import os


def write_rounds(root: str, rounds: list[list[str]], barrier, results) -> None:
    """For each round: wait for the other writer, then encode the round's texts through a fresh cache; finally
    put this process's document fingerprint of the model on ``results``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from embedlab.cache import EmbeddingCache, model_fingerprint
    from embedlab.models import tiny_bi_encoder

    torch.set_num_threads(1)
    model = tiny_bi_encoder(seed=0)
    for texts in rounds:
        barrier.wait()
        EmbeddingCache(root).encode(model, texts)
    results.put(model_fingerprint(model, "document"))
