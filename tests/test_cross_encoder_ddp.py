"""Cross-encoder DDP on 2 CPU processes (gloo) against one process holding the global batch.

As for the bi-encoder (tests/test_distributed.py, whose worker helpers this file reuses): in float64, two ranks
with 4 groups each (a positive and 2 negatives per query) take the same optimizer step as one process on the 8
groups, computed here by hand (score every pair, the loss, ``backward``, clip, SGD). Each rank's loss is a mean
over its own queries, so DDP's gradient average over ranks is the gradient of the global batch's mean loss.
Distributed evaluation (scoring batches sharded, (index, score) rows gathered, metrics once on rank 0) equals
the single-process ``trainer.test`` for reranking and STS.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import pytest
import torch

from embedlab.data.collate import collate_examples
from tests.conftest import assert_rel, make_examples, join_process_group, clipped_sgd_step
from tests.test_distributed import CLIP, LOCAL_BATCH, LR, WORLD, _free_port, _make_capture, _trainer

# two spawned processes with a Lightning fit and test each: the slow step (the bi-encoder's DDP checks, which
# share the worker machinery, stay in the fast suite)
pytestmark = pytest.mark.slow
LOSSES = ("listwise", "bce", "ranknet")


def build_module(loss: str, dtype: torch.dtype = torch.float64, task: str = "retrieval"):
    from embedlab.evaluation.first_stage import BM25Retriever
    from embedlab.lightning import CrossEncoderModule
    from embedlab.losses import BinaryCrossEntropyLoss, ListwiseSoftmaxLoss, RankNetLoss
    from embedlab.models import tiny_cross_encoder

    losses = {"listwise": ListwiseSoftmaxLoss, "bce": BinaryCrossEntropyLoss, "ranknet": RankNetLoss}
    module = CrossEncoderModule(
        model=tiny_cross_encoder(seed=0, max_length=24),
        loss=losses[loss](),
        optimizer=functools.partial(torch.optim.SGD, lr=LR),
        first_stage=BM25Retriever(stemmer=None, stopwords=None),
        evaluation={"batch_size": 5} | ({"top_k": 7, "k_values": [1, 3, 5]} if task == "retrieval" else {}),
    )
    return module.to(dtype)


def examples():
    out = make_examples(WORLD * LOCAL_BATCH, negatives=True)
    for i, ex in enumerate(out):  # a second negative: groups of 3 candidates
        ex.negatives = ex.negatives + [f"Another unrelated remark {i}."]
        ex.negative_ids = ex.negative_ids + [f"m{i}"]
    return out


def reference(loss: str) -> dict:
    module = build_module(loss)
    value = module.loss(module.score_batch(collate_examples(examples())))["loss"]
    value.backward()
    grads, params = clipped_sgd_step(module, CLIP, LR)
    return {"loss": float(value), "grads": grads, "params": params}


def _worker(rank: int, port: int, out_dir: str, data_root: str) -> None:
    join_process_group(rank, port, WORLD)
    from torch.utils.data import DataLoader

    from embedlab.data.collate import ExampleDataset

    out = Path(out_dir)
    local = examples()[rank * LOCAL_BATCH : (rank + 1) * LOCAL_BATCH]
    for loss in LOSSES:
        loader = DataLoader(ExampleDataset(local), batch_size=LOCAL_BATCH, shuffle=False, collate_fn=collate_examples)
        module = build_module(loss)
        capture = _make_capture()(1)
        trainer = _trainer([capture], max_steps=1, limit_val_batches=0, use_distributed_sampler=False, gradient_clip_val=CLIP)
        trainer.fit(module, train_dataloaders=loader)
        params = {n: p.detach().clone() for n, p in module.named_parameters()}
        torch.save({"losses": capture.losses, "grads": capture.grads, "params": params}, out / f"{loss}.rank{rank}.pt")
    trainer = _trainer([], use_distributed_sampler=True, float64=False, default_root_dir=out_dir)
    metrics = {task: trainer.test(build_module("bce", torch.float32, task), datamodule=_datamodule(data_root, task), verbose=False)[0] for task in ("retrieval", "sts")}
    torch.save(metrics, out / f"eval.rank{rank}.pt")


def _datamodule(data_root: str, task: str):
    from embedlab.data import BeirSource, EmbeddingDataModule, STSSource

    if task == "sts":
        return EmbeddingDataModule(test=STSSource(str(Path(data_root) / "stsbenchmark" / "sts-test.csv")))
    return EmbeddingDataModule(test=BeirSource(str(Path(data_root) / "scifact"), split="test"))


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory, tiny_data_root):
    out = tmp_path_factory.mktemp("ce_ddp")
    start = time.perf_counter()
    torch.multiprocessing.spawn(_worker, args=(_free_port(), str(out), str(tiny_data_root)), nprocs=WORLD, join=True)
    results = {p.name.removesuffix(".pt"): torch.load(p, weights_only=False) for p in out.glob("*.pt")}
    results["wall_seconds"] = time.perf_counter() - start
    return results


@pytest.mark.parametrize("loss", LOSSES)
def test_cross_encoder_ddp_matches_single_process_global_batch(ddp_results, loss):
    """2 gloo ranks x 4 groups == 1 process x 8 groups: loss (mean over ranks), gradients, parameters after a step."""
    ref = reference(loss)
    ranks = [ddp_results[f"{loss}.rank{r}"] for r in range(WORLD)]
    assert_rel(torch.tensor(sum(r["losses"][0] for r in ranks) / WORLD), torch.tensor(ref["loss"]), f"{loss} loss")
    assert set(ranks[0]["grads"]) == set(ref["grads"]) and len(ref["grads"]) > 10
    for r in ranks:
        for n, g in ref["grads"].items():
            assert_rel(r["grads"][n], g, f"{loss} grad {n}")
        for n, p in ref["params"].items():
            assert_rel(r["params"][n], p, f"{loss} param {n} after the step")
    start = dict(build_module(loss).named_parameters())
    assert any(not torch.equal(start[n], p) for n, p in ref["params"].items())


@pytest.mark.parametrize("task", ["retrieval", "sts"])
def test_cross_encoder_distributed_evaluation_equals_single_process(ddp_results, tiny_data_root, task, tmp_path):
    import lightning as L

    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path
    )
    single = trainer.test(build_module("bce", torch.float32, task), datamodule=_datamodule(str(tiny_data_root), task), verbose=False)[0]
    assert ("test/ndcg@5" in single and "test/first_stage/ndcg@5" in single) if task == "retrieval" else "test/spearman" in single
    for r in range(WORLD):
        got = ddp_results[f"eval.rank{r}"][task]
        assert set(got) == set(single)
        for key, value in single.items():
            if not key.endswith("seconds_per_query"):
                assert got[key] == pytest.approx(value, abs=1e-6), (r, key)
