"""GradCache in one process: the same loss and gradients as the plain step, any loss, dropout replayed.

References are computed independently of ``grad_cache_backward``: the plain full-batch step (embed,
loss, ``backward``), or, with dropout on, the same mini-batch forward passes run with a graph in the same
RNG order. ``assert_rel``: max |a - b| <= 1e-5 * max |b| per tensor (tests/conftest.py).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

from embedlab.data.collate import collate_examples
from embedlab.data.records import Example
from embedlab.lightning import BiEncoderModule
from embedlab.lightning import grad_cache as gc
from embedlab.losses import CoSENTLoss, MatryoshkaLoss, MultipleNegativesRankingLoss
from embedlab.models import tiny_bi_encoder
from embedlab.models.cpu_dropout import use_fast_cpu_dropout
from tests.conftest import TOPICS, assert_rel, compose_config, make_examples


def _module(loss: nn.Module, dropout: float = 0.0, dtype=torch.float32, **kwargs) -> BiEncoderModule:
    module = BiEncoderModule(tiny_bi_encoder(seed=0, max_seq_length=16), loss, functools.partial(torch.optim.SGD, lr=0.1), None, **kwargs)
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = dropout
    return module.to(dtype)


def _scored_examples(n: int) -> list[Example]:
    return [Example(query=TOPICS[i % 12][1], positive=TOPICS[(i * 5 + 1) % 12][1] + f" {i}", score=(i * 7 % 11) / 10) for i in range(n)]


LOSSES = {
    "mnrl": (lambda: MultipleNegativesRankingLoss(), lambda: make_examples(8)),
    "mnrl_negatives_symmetric_mask": (
        lambda: MultipleNegativesRankingLoss(symmetric=True, mask_duplicates=True),
        lambda: make_examples(8, negatives=True, duplicates=True),
    ),
    "cosent": (lambda: CoSENTLoss(), lambda: _scored_examples(8)),
    "matryoshka_mnrl": (lambda: MatryoshkaLoss(MultipleNegativesRankingLoss(), dims=[32, 16, 8]), lambda: make_examples(8, negatives=True)),
}


def _grads(module: BiEncoderModule) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return grads


def _grad_cache(module: BiEncoderModule, batch: dict, mini_batch_size: int) -> dict[str, torch.Tensor]:
    queries, docs = module.batch_texts(batch)
    return gc.grad_cache_backward(
        encode=module.model,
        sides=[module.tokenize(queries, "query"), module.tokenize(docs, "document")],
        assemble=lambda embs: module.assemble(batch, *embs),
        loss=module.loss,
        mini_batch_size=mini_batch_size,
    )


# default run: the three loss families at uneven mini-batches of 3; slow: the edge sizes and Matryoshka
SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    ("name", "mini_batch_size"),
    [("mnrl", 3), ("mnrl_negatives_symmetric_mask", 3), ("cosent", 3)]
    + [pytest.param(*case, marks=SLOW) for case in (("matryoshka_mnrl", 3), ("mnrl", 1), ("mnrl", 64))],
    ids=lambda v: str(v),
)
def test_grad_cache_equals_plain_step(name, mini_batch_size):
    """GradCache (mini-batches of 3 = uneven chunks; of 1; of the whole batch) == one full-batch forward/backward: the loss and
    every parameter gradient, for MNRL (with hard negatives, symmetric, masking), CoSENT and Matryoshka.
    float64, as in tests/test_distributed.py (float32: see the next test)."""
    make_loss, make_data = LOSSES[name]
    module = _module(make_loss(), dtype=torch.float64)
    batch = collate_examples(make_data())
    plain = module.loss(module.embed_batch(batch))
    plain["loss"].backward()
    want = _grads(module)
    got_terms = _grad_cache(module, batch, mini_batch_size)
    got = _grads(module)
    assert set(got_terms) == set(plain)
    for term in plain:
        assert_rel(got_terms[term], plain[term].detach(), f"{name} {term}")
    assert set(got) == set(want) and len(want) > 10
    for n, g in want.items():
        assert_rel(got[n], g, f"{name} grad {n}")


@pytest.mark.slow
def test_grad_cache_equals_plain_step_float32():
    """The same in float32, the training dtype: gradients agree to 1e-5 of the largest gradient entry of the
    model (per-tensor relative errors reach ~3e-3 only on attention key biases, whose true gradient is 0
    and whose float32 value is rounding noise of ~1e-9)."""
    module = _module(MultipleNegativesRankingLoss(symmetric=True, mask_duplicates=True))
    batch = collate_examples(make_examples(8, negatives=True, duplicates=True))
    plain = module.loss(module.embed_batch(batch))
    plain["loss"].backward()
    want = _grads(module)
    got_loss = _grad_cache(module, batch, 3)["loss"]
    got = _grads(module)
    assert_rel(got_loss, plain["loss"].detach(), "loss")
    scale = max(float(g.abs().max()) for g in want.values())
    worst = max(float((got[n] - g).abs().max()) for n, g in want.items())
    assert worst <= 1e-5 * scale, worst / scale


def _chunked_reference(module: BiEncoderModule, batch: dict, mini_batch_size: int) -> torch.Tensor:
    """Forward every mini-batch with a graph, in GradCache's order (query chunks, then document chunks):
    the same random numbers as GradCache's first pass, so the same dropout masks; then loss and backward."""
    queries, docs = module.batch_texts(batch)
    embs = []
    for features in (module.tokenize(queries, "query"), module.tokenize(docs, "document")):
        embs.append(torch.cat([module.model(chunk) for chunk in gc.split_features(features, mini_batch_size)]))
    loss = module.loss(module.assemble(batch, *embs))["loss"]
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("fast_cpu_dropout", [False, True], ids=["torch_dropout", "fast_cpu_dropout"])
def test_grad_cache_replays_dropout_masks(monkeypatch, fast_cpu_dropout):
    """Dropout 0.1: GradCache's re-forward under the saved RNG states gives exactly the gradient of the
    mini-batches' own forward pass (the masks of pass 1 and pass 2 are the same), with PyTorch's dropout
    and with embedlab.models.cpu_dropout. Without the replay (RandContext disabled) the gradient differs."""
    module = _module(MultipleNegativesRankingLoss(), dropout=0.1)
    if fast_cpu_dropout:
        use_fast_cpu_dropout(module.model.transformer.backbone)
    batch = collate_examples(make_examples(6))
    # dropout is really on: two forward passes of the same texts differ
    with torch.no_grad():
        features = module.tokenize(batch["query"], "query")
        assert not torch.allclose(module.model(features), module.model(features))
    torch.manual_seed(123)
    want_loss = _chunked_reference(module, batch, 4)
    want = _grads(module)
    torch.manual_seed(123)
    got_loss = _grad_cache(module, batch, 4)["loss"]
    got = _grads(module)
    assert_rel(got_loss, want_loss, "loss")
    for n, g in want.items():
        assert_rel(got[n], g, f"grad {n}")

    class NoReplay:
        def __init__(self, *tensors):
            pass

        def __enter__(self):
            pass

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr(gc, "RandContext", NoReplay)
    torch.manual_seed(123)
    _grad_cache(module, batch, 4)
    wrong = _grads(module)
    name = "model.transformer.backbone.embeddings.word_embeddings.weight"
    assert float((wrong[name] - want[name]).abs().max()) > 1e-3 * float(want[name].abs().max())


def test_rand_context_restores_the_rng_afterwards():
    ctx = gc.RandContext()
    a = torch.rand(3)
    after = torch.get_rng_state()
    with ctx:
        assert torch.equal(torch.rand(3), a)
    assert torch.equal(torch.get_rng_state(), after)


def _capture_callback():
    from lightning.pytorch.callbacks import Callback

    class Capture(Callback):
        def __init__(self):
            self.grads = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None})

    return Capture()


def _fit(module: BiEncoderModule, examples: list[Example], **trainer_kwargs):
    import lightning as L
    from torch.utils.data import DataLoader

    from embedlab.data.collate import ExampleDataset

    capture = _capture_callback()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[capture], **trainer_kwargs,
    )
    trainer.fit(module, train_dataloaders=DataLoader(ExampleDataset(examples), batch_size=4, shuffle=False, collate_fn=collate_examples))
    return trainer, capture.grads


def test_module_grad_cache_step_equals_automatic_optimization():
    """Lightning, one process: 3 batches of 4 with accumulation 2 and clipping at norm 0.5. The GradCache
    module (manual optimization: accumulation, clipping, step, schedule done by the module) makes the same
    optimizer steps as automatic optimization with Trainer(accumulate_grad_batches=2, gradient_clip_val=0.5):
    2 steps (the last one after the epoch's odd batch), the same gradients, the same weights afterwards."""
    examples = make_examples(12, negatives=True)
    plain = _module(MultipleNegativesRankingLoss(), dtype=torch.float64)
    t_plain, g_plain = _fit(plain, examples, precision="64-true", accumulate_grad_batches=2, gradient_clip_val=0.5)
    cached = _module(MultipleNegativesRankingLoss(), dtype=torch.float64, grad_cache_mini_batch_size=3, accumulate_grad_batches=2, gradient_clip_val=0.5)
    assert not cached.automatic_optimization
    t_cached, g_cached = _fit(cached, examples, precision="64-true")
    assert t_plain.global_step == t_cached.global_step == 2
    assert len(g_plain) == len(g_cached) == 2
    for step in range(2):
        for n, g in g_plain[step].items():
            assert_rel(g_cached[step][n], g, f"step {step} grad {n}")
    for (n, p), (_, q) in zip(plain.named_parameters(), cached.named_parameters()):
        assert_rel(q, p, f"param {n}")


def test_cached_mnrl_config_and_train(tmp_path, tiny_data_root):
    """loss=cached_mnrl through train(): the module runs GradCache (manual optimization), takes over the
    Trainer's clipping and accumulation, and the schedule counts optimizer steps."""
    from embedlab.training import train

    cfg = compose_config(
        "train",
        ["model=tiny", "loss=cached_mnrl", "loss.mini_batch_size=2", "loss.symmetric=true", "trainer.max_epochs=1",
         "trainer.accumulate_grad_batches=2", "trainer.gradient_clip_val=0.7", "data.batch_size=4", "data.val_fraction=0.3",
         f"data.root={tiny_data_root}", "logger=none", "trainer.accelerator=cpu"],
        tmp_path,
    )
    metrics, objects = train(cfg)
    module, trainer = objects["module"], objects["trainer"]
    assert isinstance(module.loss, gc.GradCacheLoss) and module.grad_cache_mini_batch_size == 2
    assert not module.automatic_optimization
    assert trainer.gradient_clip_val is None and trainer.accumulate_grad_batches == 1
    assert module.gradient_clip_val == 0.7 and module.accumulate_grad_batches == 2
    batches = trainer.num_training_batches
    assert trainer.global_step == math.ceil(batches / 2)
    assert module._optimizer_steps() == math.ceil(batches / 2)
    assert {"train/loss", "train/mnrl", "train/mnrl_backward", "val/ndcg@10", "test/ndcg@10"} <= set(metrics)


def test_grad_cache_is_found_inside_wrappers_and_validated():
    inner = gc.cached_mnrl(mini_batch_size=5, scale=10.0)
    assert gc.find_mini_batch_size(MatryoshkaLoss(inner, dims=[8])) == 5
    assert gc.find_mini_batch_size(MultipleNegativesRankingLoss()) is None
    assert _module(CoSENTLoss(), grad_cache_mini_batch_size=4).automatic_optimization is False
    assert _module(CoSENTLoss()).automatic_optimization is True
    with pytest.raises(ValueError, match="mini_batch_size"):
        gc.GradCacheLoss(MultipleNegativesRankingLoss(), 0)


def test_module_option_turns_grad_cache_on_for_any_loss(tmp_path, tiny_data_root):
    """`loss=cosent ++module.grad_cache_mini_batch_size=4`: the documented way to use GradCache with any loss."""
    from hydra.utils import instantiate

    cfg = compose_config("train", ["model=tiny", "loss=cosent", "++module.grad_cache_mini_batch_size=4", f"data.root={tiny_data_root}"], tmp_path)
    module = instantiate(cfg.module, model=instantiate(cfg.model), loss=instantiate(cfg.loss))
    assert module.grad_cache_mini_batch_size == 4 and not module.automatic_optimization
    assert module.trainer_overrides(cfg.trainer) == {"gradient_clip_val": None, "accumulate_grad_batches": 1}
    assert module.gradient_clip_val == cfg.trainer.gradient_clip_val
