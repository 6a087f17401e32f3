"""DDP on 2 CPU processes (gloo) against one process holding the global batch.

Exactness checks run in float64 (Trainer ``precision="64-true"``): in float32 the two sides differ by
rounding only (local vs global padding and matmul shapes), measured up to ~1.3e-5 relative on some bias
gradients, too close to the 1e-5 bar to tell a bug from rounding; in float64 that rounding is ~1e-13.

The exactness checks spawn two workers once (``ddp_results`` fixture, ~30 s on 2 busy cores); each worker
runs a real Lightning ``Trainer`` with ``DDPStrategy(process_group_backend="gloo")`` for every scenario
below, on its half of a global batch (rank r: examples ``[r*4, r*4+4)`` of each global batch of 8). The
reference is computed here, in one process, on the whole global batch with the same initial weights, by
hand (embed, loss, ``backward``, clip, SGD step), independently of the module's training step.

What is compared, per scenario (``assert_rel``: max |a - b| <= 1e-5 * max |b| for each tensor):
- loss: the mean over ranks of each rank's loss == the reference loss of the global batch. With
  gather_across_devices, rank r's loss is the cross-entropy of its 4 queries over all 8 positives (and all
  hard negatives), so the mean over the 2 ranks of those means is the mean over the 8 queries: the global
  loss; DDP averages the gradients over ranks, so the same correspondence holds for the gradients.
- gradients: every trainable parameter's gradient at the optimizer step (after DDP's / GradCache's
  all-reduce, before clipping) == the reference gradient;
- one optimizer step (SGD, gradient clipping at norm 0.5): every parameter afterwards == the reference.

Masking (item 3) is checked by hand computations in one process, and under DDP in ``gather_mask*``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from embedlab import distributed
from embedlab.data.collate import collate_examples
from embedlab.data.records import text_id
from embedlab.data.records import Example
from embedlab.losses import EmbeddedBatch, MultipleNegativesRankingLoss
from embedlab.losses.contrastive import false_negative_mask
from tests.conftest import PROJECT_ROOT, assert_rel, make_examples, join_process_group, clipped_sgd_step

WORLD = 2
LOCAL_BATCH = 4
MAX_LEN = 16
LR = 0.1
CLIP = 0.5
EVAL_BATCH = 7  # 1 query batch + 4 corpus batches = 5: DistributedSampler repeats one to make 6
K_VALUES = (1, 3, 5, 10)

# name -> what the scenario turns on; every scenario is checked against the same hand-computed reference
SCENARIOS = {
    "gather": {"loss": {"gather_across_devices": True}},
    "gather_symmetric": {"loss": {"gather_across_devices": True, "symmetric": True}},
    "gather_negatives": {"loss": {"gather_across_devices": True}, "negatives": True},
    "gather_mask": {"loss": {"gather_across_devices": True, "mask_duplicates": True, "symmetric": True}, "negatives": True, "duplicates": True},
    "grad_cache_gather": {"loss": {"gather_across_devices": True}, "negatives": True, "grad_cache": 3},
    "grad_cache_gather_mask_accumulate": {
        "loss": {"gather_across_devices": True, "mask_duplicates": True, "symmetric": True},
        "negatives": True,
        "duplicates": True,
        "grad_cache": 3,
        "accumulate": 2,
    },
}


# ---------------------------------------------------------------------------------------- data and models
def build_module(spec: dict, seed: int = 0, dtype: torch.dtype = torch.float64, task: str = "retrieval"):
    from embedlab.lightning import BiEncoderModule
    from embedlab.models import tiny_bi_encoder

    grad_cache = spec.get("grad_cache")
    module = BiEncoderModule(
        model=tiny_bi_encoder(seed=seed, max_seq_length=MAX_LEN),
        loss=MultipleNegativesRankingLoss(**spec["loss"]),
        optimizer=functools.partial(torch.optim.SGD, lr=LR),
        scheduler=None,
        grad_cache_mini_batch_size=grad_cache,
        gradient_clip_val=CLIP if grad_cache else None,
        accumulate_grad_batches=spec.get("accumulate", 1) if grad_cache else 1,
        evaluation={"batch_size": EVAL_BATCH, "similarity": None} | ({"k_values": list(K_VALUES)} if task == "retrieval" else {}),
    )
    return module.to(dtype)


def scenario_examples(spec: dict) -> list[Example]:
    steps = spec.get("accumulate", 1)
    return make_examples(WORLD * LOCAL_BATCH * steps, negatives=spec.get("negatives", False), duplicates=spec.get("duplicates", False))


def reference(spec: dict) -> dict:
    """One process, global batches of 8, plain loss (no gather, no GradCache), by hand: loss, grads, step."""
    module = build_module({"loss": {k: v for k, v in spec["loss"].items() if k != "gather_across_devices"}})
    examples = scenario_examples(spec)
    steps = spec.get("accumulate", 1)
    losses = []
    for s in range(steps):
        batch = collate_examples(examples[s * 8 : (s + 1) * 8])
        loss = module.loss(module.embed_batch(batch))["loss"]
        (loss / steps).backward()
        losses.append(float(loss.detach()))
    grads, params = clipped_sgd_step(module, CLIP, LR)
    return {"losses": losses, "grads": grads, "params": params}


# ---------------------------------------------------------------------------------------- the DDP workers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_capture():
    from lightning.pytorch.callbacks import Callback

    class Capture(Callback):
        """Each batch's local loss; the gradients the optimizer is about to apply (before clipping)."""

        def __init__(self, accumulate: int) -> None:
            self.accumulate = accumulate
            self.losses: list[float] = []
            self.grads: dict = {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            # automatic optimization hands back the loss divided by accumulate_grad_batches
            self.losses.append(float(loss) * (self.accumulate if pl_module.automatic_optimization else 1))

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}

    return Capture


def _trainer(callbacks, **kwargs):
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy

    return L.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=DDPStrategy(process_group_backend="gloo", find_unused_parameters=True),
        precision="64-true" if kwargs.pop("float64", True) else "32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        **kwargs,
    )


def _worker(rank: int, port: int, out_dir: str, names: list[str], data_root: str | None) -> None:
    """One DDP rank (Lightning sees the env of an externally launched process group and launches nothing)."""
    join_process_group(rank, port, WORLD)
    from torch.utils.data import DataLoader

    from embedlab.data.collate import ExampleDataset

    out = Path(out_dir)
    for name in names:
        spec = SCENARIOS[name]
        start = time.perf_counter()
        steps = spec.get("accumulate", 1)
        examples = scenario_examples(spec)
        local = [ex for s in range(steps) for ex in examples[s * 8 + rank * LOCAL_BATCH : s * 8 + (rank + 1) * LOCAL_BATCH]]
        loader = DataLoader(ExampleDataset(local), batch_size=LOCAL_BATCH, shuffle=False, collate_fn=collate_examples)
        module = build_module(spec)
        capture = _make_capture()(steps)
        auto = module.automatic_optimization
        trainer = _trainer(
            [capture],
            max_steps=1,
            limit_val_batches=0,
            use_distributed_sampler=False,  # each rank already holds its half
            gradient_clip_val=CLIP if auto else None,
            accumulate_grad_batches=steps if auto else 1,
        )
        trainer.fit(module, train_dataloaders=loader)
        torch.save(
            {
                "losses": capture.losses,
                "grads": capture.grads,
                "params": {n: p.detach().clone() for n, p in module.named_parameters()},
                "seconds": time.perf_counter() - start,
            },
            out / f"{name}.rank{rank}.pt",
        )
    if data_root is not None:
        start = time.perf_counter()
        trainer = _trainer([], use_distributed_sampler=True, float64=False, default_root_dir=out_dir)
        metrics = {}
        for task in ("retrieval", "sts"):
            module = build_module({"loss": {}}, dtype=torch.float32, task=task)
            metrics[task] = trainer.test(module, datamodule=_eval_datamodule(data_root, task), verbose=False)[0]
        torch.save({"metrics": metrics, "seconds": time.perf_counter() - start}, out / f"eval.rank{rank}.pt")


def _eval_datamodule(data_root: str, task: str = "retrieval"):
    from embedlab.data import BeirSource, EmbeddingDataModule, STSSource

    if task == "sts":  # 12 pairs: 2 x 2 batches of 7 and 5 texts
        source = STSSource(str(Path(data_root) / "stsbenchmark" / "sts-test.csv"))
    else:
        source = BeirSource(str(Path(data_root) / "scifact"), split="test")
    return EmbeddingDataModule(test=source)


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory, tiny_data_root):
    """Run every scenario and the distributed evaluation once in 2 gloo processes; load what each rank saved."""
    out = tmp_path_factory.mktemp("ddp")
    start = time.perf_counter()
    torch.multiprocessing.spawn(_worker, args=(_free_port(), str(out), list(SCENARIOS), str(tiny_data_root)), nprocs=WORLD, join=True)
    results = {p.name.removesuffix(".pt"): torch.load(p, weights_only=False) for p in out.glob("*.pt")}
    results["wall_seconds"] = time.perf_counter() - start
    return results


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_ddp_matches_single_process_global_batch(ddp_results, name):
    """2 gloo ranks x 4 examples == 1 process x 8 examples: loss (mean over ranks), every gradient, and the
    parameters after one clipped SGD step (plus GradCache and accumulation where the scenario says)."""
    spec = SCENARIOS[name]
    ref = reference(spec)
    ranks = [ddp_results[f"{name}.rank{r}"] for r in range(WORLD)]
    steps = spec.get("accumulate", 1)
    for s in range(steps):
        mean_over_ranks = sum(r["losses"][s] for r in ranks) / WORLD
        assert_rel(torch.tensor(mean_over_ranks), torch.tensor(ref["losses"][s]), f"{name} loss of global batch {s}")
    # DDP leaves identical gradients and parameters on every rank
    assert set(ranks[0]["grads"]) == set(ref["grads"]) and len(ref["grads"]) > 10
    for r in ranks:
        for n, g in ref["grads"].items():
            assert_rel(r["grads"][n], g, f"{name} grad {n}")
        for n, p in ref["params"].items():
            assert_rel(r["params"][n], p, f"{name} param {n} after the step")
    # the step moved the weights (the comparison above is not trivially about unchanged parameters)
    start = dict(build_module({"loss": {}}).named_parameters())
    assert any(not torch.equal(start[n], p) for n, p in ref["params"].items())


def test_gather_without_it_would_differ(ddp_results):
    """Sanity check of the reference: per-rank losses over local candidates only (no gather) are smaller
    than the global-batch loss, so the agreement above is due to the gather."""
    spec = {"loss": {}}
    examples = make_examples(8)
    module = build_module(spec)
    with torch.no_grad():
        local = [float(module.loss(module.embed_batch(collate_examples(examples[r * 4 : r * 4 + 4])))["loss"]) for r in range(WORLD)]
        full = float(module.loss(module.embed_batch(collate_examples(examples)))["loss"])
    assert abs(sum(local) / WORLD - full) > 1e-3
    gathered = sum(ddp_results[f"gather.rank{r}"]["losses"][0] for r in range(WORLD)) / WORLD
    assert gathered == pytest.approx(full, rel=1e-5)


@pytest.mark.parametrize("task", ["retrieval", "sts"])
def test_distributed_evaluation_equals_single_process(ddp_results, tiny_data_root, task, tmp_path):
    """trainer.test under DDP (texts sharded by DistributedSampler, padding duplicates, rows gathered,
    metrics computed once) == single-process trainer.test, to 1e-6, on both ranks (retrieval and STS)."""
    import lightning as L

    module = build_module({"loss": {}}, dtype=torch.float32, task=task)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path
    )
    single = trainer.test(module, datamodule=_eval_datamodule(str(tiny_data_root), task), verbose=False)[0]
    assert ("test/ndcg@10" in single and len(single) > 10) if task == "retrieval" else "test/spearman_cosine" in single
    for r in range(WORLD):
        got = ddp_results[f"eval.rank{r}"]["metrics"][task]
        assert set(got) == set(single)
        for key, value in single.items():
            if key.endswith("_seconds"):
                continue
            assert got[key] == pytest.approx(value, abs=1e-6), (r, key)


# ---------------------------------------------------------------------------------------- masking, one process
def _hand_ce(logits: list[float], target: int) -> float:
    return -logits[target] + math.log(sum(math.exp(x) for x in logits))


def test_same_document_twice_is_not_a_negative_hand_computed():
    """Queries 0 and 1 both have document "dA" as positive (two copies of it in the candidates). With masking,
    query 0's softmax holds its own copy and query 2's positive only; the loss is written out by hand."""
    q = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], dtype=torch.float64)
    p = torch.tensor([[0.8, 0.6], [0.8, 0.6], [-0.6, 0.8]], dtype=torch.float64)  # rows 0 and 1: the same doc
    scale = 10.0
    batch = EmbeddedBatch(q, p, query_ids=["q0", "q1", "q2"], positive_ids=["dA", "dA", "dC"])
    got = float(MultipleNegativesRankingLoss(scale=scale, mask_duplicates=True)(batch)["loss"])
    s = (scale * q @ p.T).tolist()  # unit vectors: cos = dot
    want = (_hand_ce([s[0][0], s[0][2]], 0) + _hand_ce([s[1][1], s[1][2]], 0) + _hand_ce(s[2], 2)) / 3
    assert got == pytest.approx(want, rel=1e-12)
    unmasked = float(MultipleNegativesRankingLoss(scale=scale)(batch)["loss"])
    assert unmasked == pytest.approx((_hand_ce(s[0], 0) + _hand_ce(s[1], 1) + _hand_ce(s[2], 2)) / 3, rel=1e-12)
    assert unmasked > got


def test_known_positive_and_same_query_are_masked_hand_computed():
    """Query q0 has known positives d0 and d2 (qrels); d2 is also the positive of query 2 and query 1 is q0
    again with positive d1. So for query 0: d1 (same query's other positive) and d2 (known positive) leave
    the softmax; for query 1 (= q0): d0 and d2. Hard negative n0 of query 2 stays a negative for all.
    Symmetric direction: positive d0 vs queries: query 1 is q0 (masked); positive d2 vs queries: queries 0
    and 1 (q0 knows d2) are masked."""
    g = torch.Generator().manual_seed(0)
    q, p, n = (F.normalize(torch.randn(*s, generator=g, dtype=torch.float64), dim=-1) for s in ((3, 4), (3, 4), (3, 1, 4)))
    batch = EmbeddedBatch(
        q, p, n, query_ids=["q0", "q0", "q2"], positive_ids=["d0", "d1", "d2"], negative_ids=["x", "y", "n0"],
        extras={"known_positive_ids": [["d0", "d2"], ["d0", "d2"], ["d2"]]},
    )
    terms = MultipleNegativesRankingLoss(scale=5.0, mask_duplicates=True, symmetric=True)(batch)
    cand = torch.cat([p, n.reshape(-1, 4)])
    s = (5.0 * q @ cand.T).tolist()  # columns: d0 d1 d2 x y n0
    fwd = (_hand_ce([s[0][c] for c in (0, 3, 4, 5)], 0) + _hand_ce([s[1][c] for c in (1, 3, 4, 5)], 0) + _hand_ce(s[2], 2)) / 3
    assert float(terms["mnrl"]) == pytest.approx(fwd, rel=1e-12)
    b = (5.0 * p @ q.T).tolist()  # rows: positives d0 d1 d2; columns: queries 0 1 2
    bwd = (_hand_ce([b[0][0], b[0][2]], 0) + _hand_ce([b[1][1], b[1][2]], 0) + _hand_ce([b[2][2]], 0)) / 3
    assert float(terms["mnrl_backward"]) == pytest.approx(bwd, rel=1e-12)


def test_false_negative_mask_never_masks_the_target():
    ids = ["a", "a", "a"]
    mask = false_negative_mask(ids, ids, [ids] * 3, ids, ids, None, torch.arange(3))
    assert mask.tolist() == [[False, True, True], [True, False, True], [True, True, False]]


def test_known_positive_ids_flow_from_qrels_to_the_batch(tiny_data_root, tmp_path):
    """readers.beir_training_pairs fills known_positive_ids from the qrels; collate passes them through;
    texts without ids get a text hash (the same text, the same id)."""
    from embedlab.data.readers import beir_training_pairs

    root = tmp_path / "beir"
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, "title": "", "text": f"doc {d}"}) + "\n" for d in ("d1", "d2", "d3")))
    (root / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "query one"}) + "\n" + json.dumps({"_id": "q2", "text": "query two"}) + "\n")
    (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t2\nq1\td3\t0\nq2\td3\t1\n")
    pairs = beir_training_pairs(root)
    assert [(p.query_id, p.positive_id, p.known_positive_ids) for p in pairs] == [
        ("q1", "d1", ["d1", "d2"]), ("q1", "d2", ["d1", "d2"]), ("q2", "d3", ["d3"]),
    ]
    batch = collate_examples(pairs + [Example(query="free text", positive="some doc")])
    assert batch["known_positive_ids"] == [["d1", "d2"], ["d1", "d2"], ["d3"], []]
    assert batch["positive_ids"][-1] == text_id("some doc")


def test_collectives_are_identities_in_one_process():
    t = torch.randn(3, 2, requires_grad=True)
    assert distributed.all_gather_with_grad(t) is t
    assert distributed.all_gather_objects({"a": 1}) == [{"a": 1}]
    assert distributed.broadcast_object(5) == 5
    assert distributed.gather_sizes(3, 4) == [[3, 4]]


# ---------------------------------------------------------------------------------------- end to end (slow)
def _run_train(tmp_path: Path, data_root: Path, name: str, extra: list[str]) -> Path:
    out = tmp_path / name
    cmd = [sys.executable, "train.py", "model=tiny", f"data.root={data_root}", f"hydra.run.dir={out}", "++trainer.max_steps=2",
           "data.batch_size=4", "data.val_fraction=0.3", "model.max_seq_length=16", "loss.gather_across_devices=true", *extra]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.mark.slow
def test_train_py_ddp_sim_end_to_end(tmp_path, tiny_data_root):
    """`python train.py trainer=ddp_sim loss.gather_across_devices=true ...` (2 gloo processes via Lightning's
    launcher) logs the same metric keys as single-process training; only rank 0 writes the run's outputs:
    one metrics.json, one model/, one W&B run, checkpoints; rank 1 adds nothing but its Hydra log file."""
    ddp = _run_train(tmp_path, tiny_data_root, "ddp", ["trainer=ddp_sim", "logger=wandb"])
    single = _run_train(tmp_path, tiny_data_root, "single", ["trainer=cpu", "logger=wandb"])
    ddp_metrics = json.loads((ddp / "metrics.json").read_text())
    single_metrics = json.loads((single / "metrics.json").read_text())
    assert set(ddp_metrics) == set(single_metrics)
    assert {"train/loss", "train/mnrl", "val/ndcg@10", "test/ndcg@10"} <= set(ddp_metrics)
    assert (ddp / "model" / "modules.json").is_file() and (ddp / "checkpoints" / "best.ckpt").is_file()
    assert len(list((ddp / "wandb").glob("offline-run-*"))) == 1
    extra = {p.name for p in ddp.iterdir()} - {p.name for p in single.iterdir()}
    assert extra <= {"train_ddp_process_1.log"}, extra


@pytest.mark.slow
def test_train_py_ddp_sim_grad_cache_end_to_end(tmp_path, tiny_data_root):
    """loss=cached_mnrl under trainer=ddp_sim with clipping and accumulation (taken over by the module)."""
    out = _run_train(tmp_path, tiny_data_root, "ddp_gc", ["trainer=ddp_sim", "loss=cached_mnrl", "loss.mini_batch_size=2",
                                                          "trainer.accumulate_grad_batches=2", "logger=none"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"train/loss", "val/ndcg@10", "test/ndcg@10"} <= set(metrics)
