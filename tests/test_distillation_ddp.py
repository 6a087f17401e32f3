"""Distillation under DDP on 2 CPU processes (gloo) against one process holding the global batch.

As for the bi-encoder (tests/test_distributed.py, whose worker helpers and tolerances this file reuses): in
float64 (Trainer ``precision="64-true"``), two ranks with 4 examples each take the same optimizer step as one
process on the 8 examples, computed here by hand: the student embeds the texts, the teacher embeds them too
(its own forward, not the module's table), the distillation terms are written out with torch ops (MSE,
``T^2 * KL``, margin-MSE, MNRL's cross-entropy), then ``backward``, clip, SGD. The student is the 32-d tiny
bi-encoder and the teacher a 48-d one, so a learned projection (32 -> 48, no bias) maps the student to the
teacher's width: its gradient and step are compared like every other parameter's.

Why the ranks' mean equals the global batch: every term is a mean over the rank's own rows (texts for the MSE,
queries for KL / margin-MSE / MNRL) and the ranks hold equally many, so the mean over ranks of the local means
is the global mean; DDP averages gradients over ranks, so the gradients correspond too. MNRL gathers the
candidates of both ranks (``gather_across_devices``): without the gather the local losses differ
(``test_mnrl_without_the_gather_would_differ``).

Scenarios (one spawn of 2 workers runs them all, each with a real Lightning ``Trainer`` and
``DDPStrategy(process_group_backend="gloo")``; the teacher's embeddings are prepared by the module's own
``on_fit_start`` from the datamodule's ``train_examples``):

- ``embedding_mse``: ``DistillationLoss(embedding=1.0)`` on (query, positive) pairs, the teacher's embeddings
  through a shared ``teacher_cache_dir`` (rank 0 encodes and stores, rank 1 reads its rows: checked).
- ``kl_mnrl``: ``kl=1.0, temperature=2.0`` + MNRL (gather) with ``contrastive_weight=0.5`` on examples with 2
  hard negatives and teacher scores (no teacher model: score distillation reads stored scores).
- ``grad_cache_margin_embedding``: ``margin_mse=1.0, embedding=0.5`` with GradCache (mini-batches of 3). The
  student's gradients match; the projection's does not (GradCache leaves it without a gradient: see
  ``test_grad_cache_trains_the_projection``, an expected failure until that is fixed).
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from embedlab.data.records import Example
from tests.conftest import assert_rel, make_examples, join_process_group, clipped_sgd_step
from tests.test_distributed import CLIP, LOCAL_BATCH, LR, MAX_LEN, WORLD, _free_port, _make_capture, _trainer

TEMPERATURE = 2.0
CONTRASTIVE_WEIGHT = 0.5
EMBEDDING_WEIGHT_GC = 0.5
SCALE = 20.0  # DistillationLoss.score_scale and MNRL's scale (both defaults)
GRAD_CACHE = 3
PROJECTION_SEED = 11  # the projection is initialized from the global RNG: seed it the same in every process

SCENARIOS = {
    "embedding_mse": {"loss": {"embedding": 1.0}, "negatives": 0, "teacher": True, "cache": True},
    "kl_mnrl": {"loss": {"kl": 1.0, "temperature": TEMPERATURE, "contrastive_weight": CONTRASTIVE_WEIGHT}, "mnrl": True, "negatives": 2},
    "grad_cache_margin_embedding": {
        "loss": {"margin_mse": 1.0, "embedding": EMBEDDING_WEIGHT_GC}, "negatives": 2, "teacher": True, "grad_cache": GRAD_CACHE,
    },
}


# ---------------------------------------------------------------------------------------- data and models
def teacher_model(dtype: torch.dtype = torch.float32):
    from embedlab.models import tiny_bi_encoder

    return tiny_bi_encoder(hidden_size=48, seed=3, max_seq_length=MAX_LEN).to(dtype)


def build_module(name: str, cache_dir: str | None = None):
    """The float64 DistillationModule of a scenario (student: tiny 32-d; teacher: tiny 48-d, float32, outside
    the module's parameters, as in training)."""
    from embedlab.lightning.distillation import DistillationModule
    from embedlab.losses import DistillationLoss, MultipleNegativesRankingLoss
    from embedlab.models import tiny_bi_encoder

    spec = SCENARIOS[name]
    contrastive = MultipleNegativesRankingLoss(gather_across_devices=True) if spec.get("mnrl") else None
    grad_cache = spec.get("grad_cache")
    torch.manual_seed(PROJECTION_SEED)
    module = DistillationModule(
        model=tiny_bi_encoder(seed=0, max_seq_length=MAX_LEN),
        loss=DistillationLoss(contrastive=contrastive, **spec["loss"]),
        optimizer=functools.partial(torch.optim.SGD, lr=LR),
        teacher=teacher_model() if spec.get("teacher") else None,
        teacher_cache_dir=cache_dir,
        grad_cache_mini_batch_size=grad_cache,
        gradient_clip_val=CLIP if grad_cache else None,
    )
    return module.to(torch.float64)


def scenario_examples(name: str) -> list[Example]:
    """The global batch of 8 (rank r holds ``[4r, 4r + 4)``): pairs, or 2 hard negatives each plus the
    teacher's scores of (positive, negative 1, negative 2). Scores are multiples of 1/4 (exact in the float32
    tensor collate builds) and differ between queries so the KL and margin terms have work to do."""
    n = SCENARIOS[name]["negatives"]
    out = make_examples(WORLD * LOCAL_BATCH, negatives=n > 0)
    if n:
        for i, ex in enumerate(out):
            ex.negatives = ex.negatives + [f"Another unrelated remark {i}."]
            ex.negative_ids = ex.negative_ids + [f"m{i}"]
            ex.teacher_scores = [2.0 + 0.25 * (i % 4), 0.5 * (i % 3), -1.0 + 0.25 * (i % 5)]
    return out


# ---------------------------------------------------------------------------------------- the reference
def _embed(model, texts: list[str], kind: str) -> torch.Tensor:
    return model(model.tokenize(texts, kind))  # (N, D)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


def reference_loss(name: str, module, examples: list[Example], contrastive: bool = True) -> torch.Tensor:
    """The scenario's loss on ``examples`` in one process, written out by hand from the student's embeddings.

    Student: queries (B, D), documents = positives then each example's negatives (B + B*n, D). Teacher
    (embedding term): its own forward on the same texts, in float64. Scores: ``SCALE * cos(q_b, [p_b, n_b1,
    n_b2])`` (B, 3). ``contrastive=False`` leaves the MNRL term out (used for the no-gather sanity check)."""
    spec = SCENARIOS[name]
    b, n = len(examples), spec["negatives"]
    queries = [e.query for e in examples]
    docs = [e.positive for e in examples] + [t for e in examples for t in e.negatives]
    q, d = _embed(module.model, queries, "query"), _embed(module.model, docs, "document")  # (B, D), (B + B*n, D)
    total = torch.zeros((), dtype=torch.float64)
    weights = spec["loss"]
    if weights.get("embedding"):
        teacher = teacher_model(torch.float64)
        with torch.no_grad():
            t = torch.cat([_embed(teacher, queries, "query"), _embed(teacher, docs, "document")])  # (B + B*n, 48)
        s = torch.cat([q, d]) @ module.projection.weight.T  # (B + B*n, 48)
        total = total + weights["embedding"] * ((s - t) ** 2).mean()
    if n:
        cand = torch.cat([d[:b].unsqueeze(1), d[b:].view(b, n, -1)], dim=1)  # (B, 1 + n, D)
        scores = SCALE * F.cosine_similarity(q.unsqueeze(1), cand, dim=-1)  # (B, 1 + n)
        teacher_scores = torch.tensor([e.teacher_scores for e in examples], dtype=torch.float64)
    if weights.get("kl"):
        pt = F.softmax(teacher_scores / TEMPERATURE, dim=-1)
        kl = (pt * (pt.log() - F.log_softmax(scores / TEMPERATURE, dim=-1))).sum(-1).mean() * TEMPERATURE**2
        total = total + weights["kl"] * kl
    if weights.get("margin_mse"):
        margins = (scores[:, :1] - scores[:, 1:]) - (teacher_scores[:, :1] - teacher_scores[:, 1:])  # (B, n)
        total = total + weights["margin_mse"] * (margins**2).mean()
    if spec.get("mnrl") and contrastive:
        logits = SCALE * _cos(q, d)  # (B, B + B*n): every positive and every hard negative of the batch
        total = total + CONTRASTIVE_WEIGHT * F.cross_entropy(logits, torch.arange(b))
    return total


@functools.lru_cache(maxsize=None)
def reference(name: str) -> dict:
    """One process, the global batch of 8, by hand: loss, gradients, one clipped SGD step (computed once per
    scenario; callers only read it)."""
    module = build_module(name)
    value = reference_loss(name, module, scenario_examples(name))
    value.backward()
    grads, params = clipped_sgd_step(module, CLIP, LR)
    return {"loss": float(value.detach()), "grads": grads, "params": params}


# ---------------------------------------------------------------------------------------- the DDP workers
def _datamodule(examples: list[Example], local: list[Example]):
    """What the module reads from a datamodule: ``train_examples`` (every rank holds the whole training set,
    as EmbeddingDataModule does; the teacher's table covers it) and this rank's loader."""
    import lightning as L
    from torch.utils.data import DataLoader

    from embedlab.data.collate import ExampleDataset, collate_examples

    class Data(L.LightningDataModule):
        train_examples = examples

        def train_dataloader(self):
            return DataLoader(ExampleDataset(local), batch_size=LOCAL_BATCH, shuffle=False, collate_fn=collate_examples)

    return Data()


def _worker(rank: int, port: int, out_dir: str) -> None:
    """One DDP rank (Lightning sees the env of an externally launched process group and launches nothing)."""
    join_process_group(rank, port, WORLD)
    out = Path(out_dir)
    for name, spec in SCENARIOS.items():
        start = time.perf_counter()
        examples = scenario_examples(name)
        local = examples[rank * LOCAL_BATCH : (rank + 1) * LOCAL_BATCH]
        module = build_module(name, cache_dir=str(out / "teacher_cache") if spec.get("cache") else None)
        teacher_calls = []
        if module.teacher is not None:
            module.teacher.register_forward_pre_hook(lambda *_: teacher_calls.append(1))
        capture = _make_capture()(1)
        auto = module.automatic_optimization
        trainer = _trainer([capture], max_steps=1, limit_val_batches=0, use_distributed_sampler=False, gradient_clip_val=CLIP if auto else None)
        trainer.fit(module, datamodule=_datamodule(examples, local))
        torch.save(
            {
                "losses": capture.losses,
                "grads": capture.grads,
                "params": {n: p.detach().clone() for n, p in module.named_parameters()},
                "teacher_calls": len(teacher_calls),
                "teacher_table": module._teacher_table,
                "seconds": time.perf_counter() - start,
            },
            out / f"{name}.rank{rank}.pt",
        )


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    """Run every scenario once in 2 gloo processes; load what each rank saved."""
    out = tmp_path_factory.mktemp("distill_ddp")
    start = time.perf_counter()
    torch.multiprocessing.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    results = {p.name.removesuffix(".pt"): torch.load(p, weights_only=False) for p in out.glob("*.pt")}
    results["wall_seconds"] = time.perf_counter() - start
    return results


# ---------------------------------------------------------------------------------------- the checks
def _compare(ddp_results, name: str, skip: tuple[str, ...] = ()) -> dict:
    """Loss (mean over ranks), every gradient and every parameter after the step == the reference, on each
    rank, for the parameters whose names do not start with one of ``skip``; returns the reference."""
    ref = reference(name)
    ranks = [ddp_results[f"{name}.rank{r}"] for r in range(WORLD)]
    assert_rel(torch.tensor(sum(r["losses"][0] for r in ranks) / WORLD), torch.tensor(ref["loss"]), f"{name} loss")
    want = {n: g for n, g in ref["grads"].items() if not n.startswith(skip)}
    for r in ranks:
        assert {n for n in r["grads"] if not n.startswith(skip)} == set(want)
        for n, g in want.items():
            assert_rel(r["grads"][n], g, f"{name} grad {n}")
        for n, p in ref["params"].items():
            if not n.startswith(skip):
                assert_rel(r["params"][n], p, f"{name} param {n} after the step")
    # real gradients: most of the student's tensors get a non-zero one (a few attention key biases are
    # mathematically zero), and the step moved the weights
    student = [g for n, g in want.items() if n.startswith("model.")]
    assert len(student) > 10 and sum(bool(g.abs().max() > 1e-6) for g in student) > 0.8 * len(student)
    start = dict(build_module(name).named_parameters())
    assert any(not torch.equal(start[n], p) for n, p in ref["params"].items() if n.startswith("model."))
    return ref


@pytest.mark.parametrize("name", ["embedding_mse", "kl_mnrl"])
def test_distillation_ddp_matches_single_process_global_batch(ddp_results, name):
    """2 gloo ranks x 4 examples == 1 process x 8 examples: loss, every gradient (the projection's too), and
    the parameters after one clipped SGD step."""
    ref = _compare(ddp_results, name)
    if SCENARIOS[name].get("teacher"):
        grad = ref["grads"]["projection.weight"]
        assert grad.shape == (48, 32) and float(grad.abs().max()) > 1e-6
        assert not torch.equal(ref["params"]["projection.weight"], build_module(name).projection.weight)
    else:
        assert build_module(name).projection is None  # score distillation: no teacher, no projection


def test_shared_teacher_cache_is_encoded_by_rank_0_and_read_by_rank_1(ddp_results):
    """With ``teacher_cache_dir`` under DDP, rank 0 runs the teacher and stores the rows; rank 1 waits for it
    and reads them (no teacher call): both ranks hold the same table, one row per distinct training text."""
    ranks = [ddp_results[f"embedding_mse.rank{r}"] for r in range(WORLD)]
    assert ranks[0]["teacher_calls"] > 0 and ranks[1]["teacher_calls"] == 0
    torch.testing.assert_close(ranks[1]["teacher_table"], ranks[0]["teacher_table"], rtol=0, atol=0)
    assert ranks[0]["teacher_table"].shape == (2 * WORLD * LOCAL_BATCH, 48)  # 8 queries + 8 positives


def test_grad_cache_distillation_ddp_matches_for_the_student(ddp_results):
    """GradCache (mini-batches of 3, manual optimization, one all-reduce by hand) under DDP: the loss and
    the student's gradients and step equal the reference's (the projection is checked separately below)."""
    _compare(ddp_results, "grad_cache_margin_embedding", skip=("projection.",))



def test_grad_cache_trains_the_projection(ddp_results):
    """Under GradCache the projection's gradient and step equal the reference's (as without GradCache)."""
    ref = reference("grad_cache_margin_embedding")
    assert float(ref["grads"]["projection.weight"].abs().max()) > 1e-6
    for r in range(WORLD):
        got = ddp_results[f"grad_cache_margin_embedding.rank{r}"]
        assert "projection.weight" in got["grads"], "no gradient for projection.weight at the optimizer step"
        assert_rel(got["grads"]["projection.weight"], ref["grads"]["projection.weight"], "grad projection.weight")
        assert_rel(got["params"]["projection.weight"], ref["params"]["projection.weight"], "projection.weight after the step")


def test_mnrl_without_the_gather_would_differ(ddp_results):
    """Sanity check of kl_mnrl: the mean of per-rank losses over local candidates only is not the global loss
    (so the agreement above needs the gather), while the KL part alone is a per-query mean that needs none."""
    module = build_module("kl_mnrl")
    examples = scenario_examples("kl_mnrl")
    halves = [examples[r * LOCAL_BATCH : (r + 1) * LOCAL_BATCH] for r in range(WORLD)]
    with torch.no_grad():
        local = sum(float(reference_loss("kl_mnrl", module, h)) for h in halves) / WORLD
        full = float(reference_loss("kl_mnrl", module, examples))
        local_kl = sum(float(reference_loss("kl_mnrl", module, h, contrastive=False)) for h in halves) / WORLD
        full_kl = float(reference_loss("kl_mnrl", module, examples, contrastive=False))
    assert abs(local - full) > 1e-3
    assert local_kl == pytest.approx(full_kl, rel=1e-12)
    gathered = sum(ddp_results[f"kl_mnrl.rank{r}"]["losses"][0] for r in range(WORLD)) / WORLD
    assert gathered == pytest.approx(full, rel=1e-5)
