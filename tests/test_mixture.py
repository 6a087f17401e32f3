"""Dataset mixtures (one dataset per step, same on every rank), per-dataset prompt/batch size, the loss per
dataset (``loss=by_dataset``), the no-duplicates sampler, and both under Lightning's DDP sampler injection."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from embedlab.data.errors import DataError
from embedlab.data.mixture import Mixture, MixtureCollate
from embedlab.data.records import Example, text_id
from embedlab.data.samplers import DuplicateKeys, MixtureBatchSampler, NoDuplicatesBatchSampler, local_slice
from embedlab.losses import CoSENTLoss, EmbeddedBatch, MultipleNegativesRankingLoss
from embedlab.losses.routing import LossByDataset
from embedlab.training import train
from embedlab.errors import UserError
from tests.conftest import PROJECT_ROOT, compose_config

# data=mixture_example with CoSENT for the STSb batches and MNRL (loss.default) for SciFact's
MIX = ["model=tiny", "experiment=mixture_example", "data.batch_size=4", "data.train.datasets.scifact.batch_size=4"]


def lightning_ddp_loaders(make_loader, world: int) -> list[DataLoader]:
    """What Lightning 2.6 does to a train loader under DDP with use_distributed_sampler=True, per rank:
    the loader is built inside the hook (BatchSampler subclasses' args captured), then rebuilt with a
    DistributedSampler injected into the batch sampler."""
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.utilities.data import _update_dataloader

    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        loader = make_loader()
    return [_update_dataloader(loader, DistributedSampler(loader.dataset, num_replicas=world, rank=r, shuffle=True, seed=0)) for r in range(world)]


# ---------------------------------------------------------------------------------------------- sampler
def test_mixture_sampler_draws_one_dataset_per_step_and_shards_it_across_ranks():
    sizes, batch_sizes = [50, 200, 31], [4, 8, 2]
    make = lambda sampler=None: MixtureBatchSampler(sampler, sizes=sizes, batch_sizes=batch_sizes, temperature=1.0, seed=3)  # noqa: E731
    offsets = [0, 50, 250, 281]
    for world in (1, 2, 3):
        ref = make()
        plan = ref.plan(epoch=0, world=world)
        assert len(plan) == ref.num_steps(world) == sum(-(-n // g) for n, g in zip(sizes, ref.global_sizes(world)))
        for batch in plan:
            d = ref.dataset_of(batch[0])
            assert all(offsets[d] <= i < offsets[d + 1] for i in batch)  # one dataset per step
            assert len(batch) == min(batch_sizes[d] * world, sizes[d] - sizes[d] % world)
            assert len(set(batch)) == len(batch)
        # every rank: the same dataset each step, equal-size disjoint slices that together are the global batch
        ranks = [[local_slice(b, r, world) for b in plan] for r in range(world)]
        for step, batch in enumerate(plan):
            parts = [ranks[r][step] for r in range(world)]
            assert sorted(i for p in parts for i in p) == sorted(batch)
            assert len({len(p) for p in parts}) == 1
    # seeded by (seed, epoch): reproducible, different across epochs
    assert make().plan(1, 2) == make().plan(1, 2) != make().plan(0, 2)


def test_mixture_sampler_through_lightnings_ddp_injection(tiny_data_root, tmp_path):
    cfg = compose_config("train", MIX + [f"data.root={tiny_data_root}"], tmp_path)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    loaders = lightning_ddp_loaders(dm.train_dataloader, world=2)
    for loader in loaders:
        assert isinstance(loader.batch_sampler, MixtureBatchSampler)
        assert isinstance(loader.batch_sampler.sampler, DistributedSampler)  # rank / world / epoch come from it
        loader.batch_sampler.sampler.set_epoch(1)  # what Lightning calls each epoch
    per_rank = [[(b["dataset"], b["query"]) for b in loader] for loader in loaders]
    assert len(per_rank[0]) == len(per_rank[1]) == len(loaders[0])
    for (d0, q0), (d1, q1) in zip(*per_rank):
        assert d0 == d1 and len(q0) == len(q1) > 0
    # the epoch Lightning set changes the plan (epoch 1 vs 0), the same way on both ranks
    epoch0 = [b["dataset"] for b in dm.train_dataloader()]
    plan = loaders[0].batch_sampler
    assert plan.global_batches(2) == MixtureBatchSampler(
        sizes=plan.sizes, batch_sizes=plan.batch_sizes, temperature=plan.temperature, seed=plan.seed
    ).plan(1, 2)
    assert len(epoch0) == len(dm.train_dataloader())


def _ddp_worker(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        sampler = MixtureBatchSampler(sizes=[40, 100], batch_sizes=[4, 8], temperature=2.0, seed=7)
        sampler.set_epoch(2)
        queue.put((rank, list(sampler)))
    finally:
        dist.destroy_process_group()


def test_mixture_sampler_reads_rank_from_torch_distributed():
    """use_distributed_sampler=False: no injected sampler, the rank and world size come from the process group."""
    import multiprocessing as mp
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    plan = MixtureBatchSampler(sizes=[40, 100], batch_sizes=[4, 8], temperature=2.0, seed=7).plan(2, 2)
    assert got[0] == [local_slice(b, 0, 2) for b in plan]
    assert got[1] == [local_slice(b, 1, 2) for b in plan]


def test_mixture_probabilities_weights_and_temperature():
    s = MixtureBatchSampler(sizes=[100, 400], batch_sizes=[10, 10])
    assert s.probabilities() == pytest.approx([0.2, 0.8])  # null weights: batches per pass (size-proportional)
    s = MixtureBatchSampler(sizes=[100, 400], batch_sizes=[10, 10], temperature=2.0)
    assert s.probabilities() == pytest.approx([1 / 3, 2 / 3])  # sqrt(10) : sqrt(40)
    s = MixtureBatchSampler(sizes=[100, 400], batch_sizes=[10, 10], weights=[3.0, 1.0])
    assert s.probabilities() == pytest.approx([0.75, 0.25])
    s = MixtureBatchSampler(sizes=[100, 400], batch_sizes=[10, 10], weights=[1.0, 9.0], temperature=1e9)
    assert s.probabilities() == pytest.approx([0.5, 0.5], abs=1e-6)  # high temperature: uniform
    # empirical draw frequencies follow the probabilities; steps_per_epoch is honoured
    s = MixtureBatchSampler(sizes=[100, 400], batch_sizes=[10, 10], weights=[3.0, 1.0], steps_per_epoch=4000, seed=1)
    counts = Counter(s.dataset_of(b[0]) for b in s.plan(0, 1))
    assert sum(counts.values()) == 4000 and counts[0] / 4000 == pytest.approx(0.75, abs=0.03)
    # a dataset drawn more often than its size allows starts a new shuffled pass; no index twice in a batch
    batches = [b for b in s.plan(0, 1) if s.dataset_of(b[0]) == 0]
    seen = Counter(i for b in batches for i in b)
    assert set(seen) == set(range(100)) and max(seen.values()) - min(seen.values()) <= 1
    with pytest.raises(DataError, match="weight"):
        MixtureBatchSampler(sizes=[10], batch_sizes=[2], weights=[0.0])
    with pytest.raises(DataError, match="fewer than the 4 devices"):
        MixtureBatchSampler(sizes=[3], batch_sizes=[2]).plan(0, 4)


# ---------------------------------------------------------------------------------------------- no duplicates
def _dup_examples(n: int, seed: int = 0) -> list[Example]:
    rng = np.random.default_rng(seed)
    q = rng.integers(0, int(n * 0.6), n)
    d = rng.integers(0, int(n * 0.5), n)
    return [Example(query=f"q{a}", positive=f"d{b}", query_id=f"q{a}", positive_id=f"d{b}") for a, b in zip(q.tolist(), d.tolist())]


def _assert_no_duplicates(examples, batches):
    for b in batches:
        qs = [examples[i].query_id for i in b]
        ds = [examples[i].positive_id for i in b]
        assert len(set(qs)) == len(qs) and len(set(ds)) == len(ds)


def test_no_duplicates_sampler_covers_every_example_once_without_duplicates():
    examples = _dup_examples(2000)
    sampler = NoDuplicatesBatchSampler(keys=examples, batch_size=32, seed=5)
    batches = list(sampler)
    _assert_no_duplicates(examples, batches)
    assert sorted(i for b in batches for i in b) == list(range(len(examples)))  # exactly once per epoch
    assert len(batches) == len(sampler) and sum(len(b) < 32 for b in batches) <= 3
    # plain batching of the same data would hold duplicates: the sampler is doing something
    plain = [list(range(i, min(i + 32, 2000))) for i in range(0, 2000, 32)]
    with pytest.raises(AssertionError):
        _assert_no_duplicates(examples, plain)
    # drop_last: only full batches; DDP: global batches of 32 x world, cut to a multiple of the world
    assert all(len(b) == 32 for b in NoDuplicatesBatchSampler(keys=examples, batch_size=32, drop_last=True, seed=5))
    two = NoDuplicatesBatchSampler(keys=examples, batch_size=16, seed=5)
    plan = two.global_batches(world=2)
    _assert_no_duplicates(examples, plan)  # no duplicate across the ranks' halves either
    assert all(len(b) % 2 == 0 for b in plan) and len(examples) - sum(map(len, plan)) <= len(plan)


def test_no_duplicates_checks_hard_negatives_and_text_hashes():
    a = Example(query="qa", positive="shared doc", negatives=["neg x"])
    b = Example(query="qb", positive="neg x", negatives=["neg y"])  # b's positive is a's hard negative
    c = Example(query="qc", positive="other", negatives=["neg y"])  # shares only a hard negative with b: fine
    d = Example(query="qd", positive="shared doc")  # same positive text as a (no ids: text hash)
    keys = DuplicateKeys([a, b, c, d])
    batches = NoDuplicatesBatchSampler(keys=keys, batch_size=4, shuffle=False).plan(0, 1)
    assert batches == [[0, 2], [1, 3]]


def test_no_duplicates_sampler_plans_100k_examples():
    """A large plan: every example exactly once per epoch, no query or document twice in a batch (the
    deferral queue, not a rescan of the whole dataset per batch, is what keeps this linear)."""
    examples = _dup_examples(100_000, seed=1)
    sampler = NoDuplicatesBatchSampler(keys=examples, batch_size=64, seed=0)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(100_000))
    _assert_no_duplicates(examples, batches)


def test_no_duplicates_in_the_datamodule_and_under_ddp_injection(tmp_path, tiny_data_root):
    table = tmp_path / "pairs.jsonl"
    rows = [{"query": f"question {i % 7}", "positive": f"answer {i % 5}"} for i in range(40)]
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose_config(
        "train", ["model=tiny", "data=pairs", f"data.train.path={table}", "data.batch_size=4", "++data.no_duplicates=true", f"data.root={tiny_data_root}"], tmp_path
    )
    dm = instantiate(cfg.data)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    for b in batches:
        assert len(set(b["query"])) == len(b["query"]) and len(set(b["positive"])) == len(b["positive"])
    assert sum(len(b["query"]) for b in batches) == len(dm.train_examples)
    loaders = lightning_ddp_loaders(dm.train_dataloader, world=2)
    per_rank = [list(loader) for loader in loaders]
    assert len(per_rank[0]) == len(per_rank[1])
    for b0, b1 in zip(*per_rank):
        both = b0["positive"] + b1["positive"]
        assert len(b0["positive"]) == len(b1["positive"]) and len(set(both)) == len(both)


# ---------------------------------------------------------------------------------------------- config, collate, loss
def test_mixture_config_batches_prompts_and_dataset_names(tmp_path, tiny_data_root):
    cfg = compose_config("train", MIX + [f"data.root={tiny_data_root}", "data.train.steps_per_epoch=40"], tmp_path)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    assert list(dm.mixture_examples) == ["scifact", "stsb"]
    assert dm.val_task is not None and set(dm.val_task.queries) <= {f"q{i}" for i in range(12)}  # carved from scifact
    assert len(dm.train_examples) == sum(map(len, dm.mixture_examples.values()))
    batches = list(dm.train_dataloader())
    assert len(batches) == 40 and {b["dataset"] for b in batches} == {"scifact", "stsb"}
    for b in batches:
        if b["dataset"] == "scifact":
            assert b["scores"] is None and len(b["query"]) == 4
            assert all(q.startswith("query: ") for q in b["query"]) and all(p.startswith("passage: ") for p in b["positive"])
            # ids come from the data (BEIR ids), untouched by prompts
            assert all(not i.startswith("h:") for i in b["positive_ids"])
        else:
            assert b["scores"] is not None and len(b["query"]) == 4
            assert not any(q.startswith(("query: ", "passage: ")) for q in b["query"] + b["positive"])


def test_mixture_collate_prefixes_after_ids():
    collate = MixtureCollate(["a"], ["Q: "], ["D: "])
    e = Example(query="q", positive="p", negatives=["n"])
    batch = collate([(0, e)])
    assert (batch["query"], batch["positive"], batch["negatives"], batch["dataset"]) == (["Q: q"], ["D: p"], ["D: n"], "a")
    assert batch["positive_ids"] == [text_id("p")] and batch["negative_ids"] == [text_id("n")]
    with pytest.raises(DataError, match="mixes datasets"):
        MixtureCollate(["a", "b"], ["", ""], ["", ""])([(0, e), (1, e)])


def test_mixture_config_errors(tiny_data_root):
    src = SimpleNamespace(examples=lambda: [Example("q", "p")])
    with pytest.raises(DataError, match="unknown keys"):
        Mixture({"a": {"source": src, "wieght": 2}})
    with pytest.raises(DataError, match="eval_dataset"):
        Mixture({"a": {"source": src}}, eval_dataset="b")
    with pytest.raises(DataError, match="query and document"):
        Mixture({"a": {"source": src, "prompt": {"qry": "x"}}})
    with pytest.raises(DataError, match="at least one"):
        Mixture({"a": None})
    with pytest.raises(DataError, match="needs a `source`"):
        Mixture({"a": {"weight": 1.0}})
    for bad in (0, -1.0, float("nan"), "hot", None, True):
        with pytest.raises(DataError, match=r"^mixture temperature must be a number > 0, got "):
            Mixture({"a": {"source": src}}, temperature=bad)
    assert Mixture({"a": {"source": src}}, temperature=2).temperature == 2.0


def test_mixture_entry_with_a_loss_points_to_the_loss_config():
    """The loss per dataset lives in the loss config; a `loss` in a mixture entry is refused with where it goes."""
    src = SimpleNamespace(examples=lambda: [Example("q", "p")])
    with pytest.raises(DataError) as e:
        Mixture({"a": {"source": src}, "stsb": {"source": src, "loss": "cosent"}})
    assert str(e.value) == (
        "mixture dataset 'stsb': a mixture entry takes no `loss`; set the loss per dataset in the loss config: "
        "loss=by_dataset loss.losses={stsb: cosent}"
    )
    with pytest.raises(DataError, match=r"loss=by_dataset loss\.losses=\{a: <loss>\}$"):
        Mixture({"a": {"source": src, "loss": {"_target_": "embedlab.losses.CoSENTLoss"}}})


def _batch(dataset=None, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return EmbeddedBatch(
        query=torch.randn(b, 8, generator=g, requires_grad=True),
        positive=torch.randn(b, 8, generator=g),
        scores=torch.rand(b, generator=g),
        extras={"dataset": dataset} if dataset else {},
    )


def test_loss_by_dataset_dispatches_and_keeps_term_names():
    cosent = CoSENTLoss()
    loss = LossByDataset(default=MultipleNegativesRankingLoss(), losses={"sts": cosent})
    sts, pairs, unnamed = loss(_batch("sts")), loss(_batch("pairs")), loss(_batch())
    assert set(sts) == {"loss", "cosent", "loss@sts"} and torch.equal(sts["loss"], cosent(_batch("sts"))["loss"])
    assert set(pairs) == {"loss", "mnrl", "loss@pairs"}
    assert set(unnamed) == {"loss", "mnrl"}
    sts["loss"].backward()
    # config form (loss.losses): option names and inline configs; datasets naming one option share one module
    options = {"cosent": {"_target_": "embedlab.losses.CoSENTLoss", "scale": 30.0}, "mnrl": {"_target_": "embedlab.losses.MultipleNegativesRankingLoss"}}
    routed = LossByDataset(
        default={"_target_": "embedlab.losses.MultipleNegativesRankingLoss"},
        losses={"a": "cosent", "b": {"_target_": "embedlab.losses.CosineSimilarityLoss"}, "c": None, "d": "cosent"},
        options=options,
    )
    assert routed.loss_for("a") is routed.loss_for("d") and routed.loss_for("a").scale == 30.0
    assert type(routed.loss_for("b")).__name__ == "CosineSimilarityLoss"
    assert routed.loss_for("c") is routed.loss_for("zzz") is routed.loss_for(None) is routed.default
    with pytest.raises(UserError, match=r"^loss\.losses\.a: unknown loss 'cosnet'; options: \['cosent', 'mnrl'\]$"):
        LossByDataset(default=MultipleNegativesRankingLoss(), losses={"a": "cosnet"}, options=options)


def test_mixture_example_trains_with_one_loss_per_dataset(tmp_path, tiny_data_root):
    """train.py's path end to end: steps of both datasets, each with its loss (logged per step), validation and
    test on SciFact."""
    overrides = MIX + [f"data.root={tiny_data_root}", "trainer.max_epochs=2", "data.train.steps_per_epoch=5", "trainer.log_every_n_steps=1", "trainer.accelerator=cpu",
                       "logger=csv", "save_model=false"]
    metrics, objects = train(compose_config("train", overrides, tmp_path))
    assert isinstance(objects["module"].loss, LossByDataset)
    assert "test/ndcg@10" in metrics and "val/ndcg@10" in metrics
    rows = [r for r in csv.DictReader((tmp_path / "csv" / "metrics.csv").open()) if r.get("train/loss")]
    loader = objects["datamodule"].train_dataloader()
    drawn = []
    for epoch in range(2):
        loader.batch_sampler.set_epoch(epoch)
        drawn += [b["dataset"] for b in loader]
    assert len(rows) == objects["trainer"].global_step == len(drawn)
    assert {"scifact", "stsb"} == set(drawn)
    # each step's train/loss is the loss of the dataset drawn for that step: cosent for stsb, mnrl for scifact
    # (Lightning re-logs a term's last value on steps that did not compute it, so only the matching terms are
    # compared; README "Dataset mixtures")
    term = {"stsb": "train/cosent", "scifact": "train/mnrl"}
    for row, dataset in zip(sorted(rows, key=lambda r: int(r["step"])), drawn):
        assert float(row["train/loss"]) == pytest.approx(float(row[term[dataset]]))
        assert float(row["train/loss"]) == pytest.approx(float(row[f"train/loss@{dataset}"]))


@pytest.mark.slow
def test_mixture_under_ddp_sim_with_cross_device_negatives(tmp_path, tiny_data_root):
    """2 gloo processes, Lightning's own sampler injection; mnrl gathers across ranks, so a rank drawing another
    dataset (cosent, no collective) than its peer would hang the run (timeout). Two processes and a training
    run: marked slow."""
    out = tmp_path / "run"
    cmd = [sys.executable, "train.py", "trainer=ddp_sim", "model=tiny", "experiment=mixture_example",
           "loss.default.gather_across_devices=true", f"data.root={tiny_data_root}", "data.batch_size=2",
           "data.train.datasets.scifact.batch_size=2", "data.train.steps_per_epoch=6", "trainer.max_epochs=1",
           "trainer.log_every_n_steps=1", "logger=csv", "save_model=false", f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "test/ndcg@10" in json.loads((out / "metrics.json").read_text())
    rows = list(csv.DictReader((out / "csv" / "metrics.csv").open()))
    assert any(r.get("train/loss@stsb") for r in rows) and any(r.get("train/loss@scifact") for r in rows)
