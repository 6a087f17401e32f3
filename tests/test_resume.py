"""Exact resume: a run SIGKILLed mid-epoch and resumed from last.ckpt ends where the uninterrupted run ends.

The reference is the same command run without interruption: its final ``last.ckpt`` weights, optimizer and
LR-scheduler states and its validation metrics. The interrupted run is ``train.py`` killed with SIGKILL (no
cleanup code runs) after optimizer step ``k``, while checkpoints are written every 2 steps, so the resume
starts from step ``k - 1`` in the middle of an epoch and must replay the remaining batches in the same order,
with the same dropout masks and learning rates. Dropout is on (the tiny model has none of its own:
:func:`tiny_with_dropout`), the training pairs carry mined hard negatives, and the cases cover the three
batch samplers (shuffle, no-duplicates, mixture), GradCache and a resume from an end-of-epoch checkpoint.

Sampler- and RNG-level checks come first: they name the part that broke when the end-to-end ones fail.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data.distributed import DistributedSampler

from embedlab.data.samplers import (
    MixtureBatchSampler,
    NoDuplicatesBatchSampler,
    ShuffleBatchSampler,
    TrainPosition,
    local_slice,
)
from embedlab.lightning.checkpoint_io import SafeCheckpointIO
from embedlab.lightning.resume import capture_rng_states, restore_rng_states, training_position
from embedlab.models.checkpoint import safe_load
from embedlab.training import train
from tests.conftest import PROJECT_ROOT, TOPICS, compose_config, make_examples


# ---------------------------------------------------------------------------------------------- test hooks
class KillAfterStep(L.Callback):
    """Test-only: SIGKILL this process right after optimizer step ``step`` (before that step's checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def tiny_with_dropout(dropout: float = 0.1, **kwargs):
    """``model=tiny`` with every dropout of the BERT at ``dropout``, on embedlab's CPU dropout like a real model."""
    from embedlab.models import tiny_bi_encoder
    from embedlab.models.cpu_dropout import use_fast_cpu_dropout

    model = tiny_bi_encoder(**kwargs)
    backbone = model.transformer.backbone
    for module in backbone.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = float(dropout)
    backbone.config.hidden_dropout_prob = backbone.config.attention_probs_dropout_prob = float(dropout)
    use_fast_cpu_dropout(backbone)
    return model


# ------------------------------------------------------------------------------------------- samplers
def _samplers(start=None, sampler=None):
    examples = make_examples(23, negatives=True, duplicates=True)
    return {
        "shuffle": ShuffleBatchSampler(sampler, n=23, batch_size=4, seed=3, start=start),
        "no_duplicates": NoDuplicatesBatchSampler(sampler, keys=examples, batch_size=4, seed=3, start=start),
        "mixture": MixtureBatchSampler(sampler, sizes=[15, 8], batch_sizes=[4, 2], seed=3, start=start),
    }


@pytest.mark.parametrize("kind", ["shuffle", "no_duplicates", "mixture"])
def test_sampler_started_mid_epoch_yields_the_rest_of_that_epoch(kind):
    """start=(e, k): before any set_epoch, the first iteration is epoch e's batches from k on; the next epoch is
    not skipped."""
    reference = _samplers()[kind]
    reference.set_epoch(1)
    epoch1 = list(reference)
    reference.set_epoch(2)
    epoch2 = list(reference)
    assert epoch1 != epoch2  # the plan depends on the epoch, so the check below can tell them apart

    resumed = _samplers(start=TrainPosition(1, 2))[kind]
    assert list(resumed) == epoch1[2:]
    resumed.sampler.set_epoch(2)  # what Lightning calls at the next epoch
    assert list(resumed) == epoch2


def test_resumed_sampler_reports_the_first_epochs_length():
    """Lightning takes num_training_batches (and the LR schedule's length) from len() before its first set_epoch:
    a resumed no-duplicates sampler reports epoch 0's count, as in the uninterrupted run, while it yields the
    start epoch's batches (whose count differs here: clashes add a batch in epoch 4)."""
    fresh = _samplers()["no_duplicates"]
    lengths = [len(fresh.plan(epoch, 1)) for epoch in (0, 4)]
    assert lengths == [6, 7]
    resumed = _samplers(start=TrainPosition(4, 2))["no_duplicates"]
    assert len(resumed) == len(fresh) == 6
    assert list(resumed) == fresh.plan(4, 1)[2:]


def test_sampler_start_under_lightning_ddp_sampler():
    """Lightning's injected DistributedSampler says epoch 0 until set_epoch: the start's epoch wins, each rank skips."""
    plain = ShuffleBatchSampler(n=23, batch_size=2, seed=3)
    plain.set_epoch(1)
    global_batches = plain.global_batches(world=2)
    for rank in range(2):
        ddp = DistributedSampler(range(23), num_replicas=2, rank=rank, shuffle=False)
        sampler = ShuffleBatchSampler(ddp, n=23, batch_size=2, seed=3, start=TrainPosition(1, 3))
        want = [local_slice(b, rank, 2) for b in global_batches[3:]]
        assert list(sampler) == want


def test_shuffle_sampler_is_one_pass_per_epoch():
    """Every example exactly once per epoch (a short last batch unless drop_last), a permutation seeded by (seed, epoch)."""
    sampler = ShuffleBatchSampler(n=10, batch_size=4, seed=0)
    batches = list(sampler)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(i for b in batches for i in b) == list(range(10))
    assert [b for b in batches] == [list(x) for x in np.array_split(np.random.default_rng([0, 0]).permutation(10), [4, 8])]
    assert [len(b) for b in ShuffleBatchSampler(n=10, batch_size=4, seed=0, drop_last=True)] == [4, 4]
    assert list(ShuffleBatchSampler(n=5, batch_size=2, shuffle=False)) == [[0, 1], [2, 3], [4]]


def test_sampler_start_is_checked():
    with pytest.raises(ValueError, match=r"start must be a non-negative \(epoch, batch\), got \(0, -1\)"):
        ShuffleBatchSampler(n=4, batch_size=2, start=(0, -1))


# ------------------------------------------------------------------------------------ RNG and checkpoint I/O
def _draws() -> list:
    return [torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]]


def test_rng_states_survive_a_safe_checkpoint(tmp_path):
    """Captured states, written by SafeCheckpointIO and read by safe_load (restricted unpickler), restore the streams."""
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    _draws()
    SafeCheckpointIO().save_checkpoint({"rng": capture_rng_states()}, tmp_path / "a.ckpt")
    want = _draws()
    _draws()  # move every stream on
    restore_rng_states(safe_load(tmp_path / "a.ckpt")["rng"])
    assert _draws() == want


def test_checkpoint_save_failure_keeps_the_previous_checkpoint(tmp_path):
    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("no space left on device")

    io, path = SafeCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 2}, path)
    with pytest.raises(RuntimeError, match="no space left"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(1000)}, "bad": Unpicklable()}, path)
    assert io.load_checkpoint(path)["global_step"] == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_checkpoint_killed_while_saving_keeps_the_previous_checkpoint(tmp_path):
    """SIGKILL in the middle of torch.save (part of the file written): last.ckpt is the previous, complete one."""
    path = tmp_path / "last.ckpt"
    SafeCheckpointIO().save_checkpoint({"global_step": 2}, path)

    def partial_save(obj, f):
        with open(f, "wb") as out:
            out.write(b"PK" + bytes(4096))
            out.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    pid = os.fork()  # a child that already has everything imported; SIGKILL runs no cleanup code in it
    if pid == 0:
        try:
            torch.save = partial_save
            SafeCheckpointIO().save_checkpoint({"global_step": 4}, path)
        finally:
            os._exit(1)  # not reached: the save kills the child
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert SafeCheckpointIO().load_checkpoint(path)["global_step"] == 2


# ------------------------------------------------------------------------------------------ end to end
def _write_beir(folder: Path, variant: str, negatives: bool) -> None:
    """A BEIR folder: 24 documents, 24 queries (two per topic, sharing the topic's document), 4 of them test
    queries; with ``negatives`` a mined-negatives file giving each query its topic's unrelated note."""
    (folder / "qrels").mkdir(parents=True)
    corpus, queries, train, test, mined = [], [], [], [], []
    for i, (topic, text) in enumerate(TOPICS):
        corpus.append({"_id": f"d{i}", "title": topic.title(), "text": f"{text} ({variant})"})
        corpus.append({"_id": f"x{i}", "title": "", "text": f"An unrelated {variant} note number {i} about {topic} trivia."})
        for j, phrase in enumerate(("what do we know about {}?", "tell me something about {}")):
            qid = f"q{i}_{j}"
            queries.append({"_id": qid, "text": phrase.format(topic) + f" [{variant}]"})
            (test if (i in (3, 7) and j == 0) or (i in (5, 11) and j == 1) else train).append(f"{qid}\td{i}\t1")
            mined.append({"query_id": qid, "negative_ids": [f"x{i}", f"x{(i + 1) % len(TOPICS)}"]})
    (folder / "corpus.jsonl").write_text("\n".join(json.dumps(r) for r in corpus) + "\n")
    (folder / "queries.jsonl").write_text("\n".join(json.dumps(r) for r in queries) + "\n")
    header = "query-id\tcorpus-id\tscore\n"
    (folder / "qrels" / "train.tsv").write_text(header + "\n".join(train) + "\n")
    (folder / "qrels" / "test.tsv").write_text(header + "\n".join(test) + "\n")
    if negatives:
        (folder / "negatives.jsonl").write_text("\n".join(json.dumps(r) for r in mined) + "\n")


@pytest.fixture(scope="module")
def resume_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume_data")
    _write_beir(root / "scifact", "a", negatives=True)
    _write_beir(root / "second", "b", negatives=False)
    return root


def _common(root: Path) -> list[str]:
    # 20 train queries, 5 carved for validation: 15 pairs, 4 batches per epoch (4, 4, 4, 3), 8 steps in all
    return [
        "model=tiny",
        "model._target_=tests.test_resume.tiny_with_dropout",
        "+model.dropout=0.1",
        f"data.root={root}",
        "data.batch_size=4",
        "data.val_fraction=0.25",
        "trainer.max_epochs=2",
        "trainer.accelerator=cpu",
        "trainer.log_every_n_steps=1",
        "logger=none",
        "test=false",
        "save_model=false",
        "callbacks.progress_bar=null",
        "++trainer.enable_progress_bar=false",
        "callbacks.model_checkpoint_steps.every_n_train_steps=2",
    ]


HARD_NEGATIVES = [
    "data.train.hard_negatives=${data.root}/scifact/negatives.jsonl",
    "data.train.num_negatives=1",
]
CASES = {
    # plain shuffled batches with hard negatives; the LR schedule (linear warmup + decay) changes every step
    "mnrl": HARD_NEGATIVES,
    # GradCache: embeddings in mini-batches of 2 texts with RNG replay, batches without duplicate ids; one epoch
    "cached_no_duplicates": HARD_NEGATIVES
    + ["loss=cached_mnrl", "loss.mini_batch_size=2", "data.no_duplicates=true", "trainer.max_epochs=1"],
    # two datasets, one drawn per step; one epoch of 5 steps
    "mixture": [
        "data=mixture",
        "+data.train.datasets.second.source._target_=embedlab.data.BeirSource",
        "+data.train.datasets.second.source.folder=${data.root}/second",
        "+data.train.datasets.second.source.split=train",
        "data.train.steps_per_epoch=5",
        "trainer.max_epochs=1",
    ],
}


def _train_py(run_dir: Path, overrides: list[str], kill_after: int | None = None) -> None:
    """``python train.py ...``; with ``kill_after``, SIGKILLed after that optimizer step (every rank kills itself):
    a real crash, no cleanup code runs."""
    cmd = [sys.executable, "train.py", *overrides, f"hydra.run.dir={run_dir}"]
    if kill_after is not None:
        cmd += ["+callbacks.kill._target_=tests.test_resume.KillAfterStep", f"+callbacks.kill.step={kill_after}"]
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
    expected = 0 if kill_after is None else -signal.SIGKILL
    assert proc.returncode == expected, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"


def _train(run_dir: Path, overrides: list[str]) -> list[dict]:
    """The same command, in this process (as train.py runs it: compose, then train); the validation history."""
    cfg = compose_config("train", overrides, run_dir)
    _, objects = train(cfg)
    # a checkpoint written after the fit (ModelCheckpoint's on_train_end) continues with the next epoch
    assert training_position(objects["trainer"]) == TrainPosition(cfg.trainer.max_epochs, 0)
    # timings are the only entries that may differ between identical runs
    return [{k: v for k, v in row.items() if not k.endswith("_seconds")} for row in objects["module"].validation_history]


def _assert_same_run(got_dir: Path, got_history: list[dict], want_dir: Path, want_history: list[dict]) -> None:
    """The final weights, optimizer and LR-scheduler states (last.ckpt) and every validation are the same."""
    got, want = safe_load(got_dir / "checkpoints" / "last.ckpt"), safe_load(want_dir / "checkpoints" / "last.ckpt")
    assert got["global_step"] == want["global_step"]
    assert got["state_dict"].keys() == want["state_dict"].keys()
    for name, value in want["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][name], value, atol=1e-6, rtol=0, msg=lambda m: f"{name}: {m}")
    for g, w in zip(got["optimizer_states"][0]["state"].values(), want["optimizer_states"][0]["state"].values(), strict=True):
        torch.testing.assert_close(g["exp_avg_sq"], w["exp_avg_sq"], atol=1e-9, rtol=1e-5)
    assert got["lr_schedulers"] == want["lr_schedulers"]
    assert len(got_history) == len(want_history) > 0  # one validation per epoch
    for g, w in zip(got_history, want_history):
        assert g == pytest.approx(w, abs=1e-6)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, resume_data):
    """case -> (run folder, validation history) of the reference run (trained lazily, once per case)."""
    runs: dict[str, tuple[Path, list[dict]]] = {}

    def get(case: str) -> tuple[Path, list[dict]]:
        if case not in runs:
            run_dir = tmp_path_factory.mktemp(f"full_{case}")
            runs[case] = run_dir, _train(run_dir, _common(resume_data) + CASES[case])
        return runs[case]

    return get


@pytest.mark.parametrize(
    "case, kill_after, extra, position",
    [
        ("mnrl", 7, [], (1, 2)),  # last.ckpt of step 6: epoch 1 resumes at its batch 2
        ("cached_no_duplicates", 3, [], (0, 2)),  # step 2
        ("mixture", 3, [], (0, 2)),  # step 2
        # a checkpoint every 4 steps: last.ckpt is epoch 0's end, the resume starts epoch 1 from its first batch
        ("mnrl", 7, ["callbacks.model_checkpoint_steps.every_n_train_steps=4"], (1, 0)),
    ],
    ids=["mnrl_hard_negatives_mid_epoch_1", "grad_cache_no_duplicates_mid_epoch_0", "mixture", "from_epoch_end"],
)
def test_killed_and_resumed_run_equals_uninterrupted(case, kill_after, extra, position, uninterrupted, resume_data, tmp_path):
    overrides = _common(resume_data) + CASES[case] + extra
    run = tmp_path / "run"
    _train_py(run, overrides, kill_after)
    assert not (run / "metrics.json").exists()
    killed_at = safe_load(run / "checkpoints" / "last.ckpt")
    assert killed_at["embedlab_resume"]["position"] == dict(zip(("epoch", "batch"), position))
    history = _train(run, overrides + [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"])
    _assert_same_run(run, history, *uninterrupted(case))


@pytest.mark.slow
def test_killed_and_resumed_ddp_run_equals_uninterrupted(resume_data, tmp_path):
    """trainer=ddp_sim (2 gloo processes, 2 examples per rank): both ranks' RNG states are in the checkpoint and
    each rank gets its own back; the data position is the global batch. All three runs are train.py processes
    (Lightning's DDP launcher re-runs the command line). 1-2 minutes: marked slow."""
    overrides = _common(resume_data) + CASES["mnrl"] + ["trainer=ddp_sim", "data.batch_size=2"]
    full, run = tmp_path / "full", tmp_path / "run"
    _train_py(full, overrides)
    _train_py(run, overrides, kill_after=7)
    killed_at = safe_load(run / "checkpoints" / "last.ckpt")
    assert killed_at["embedlab_resume"]["position"] == {"epoch": 1, "batch": 2}
    assert len(killed_at["embedlab_resume"]["rng"]) == 2
    _train_py(run, overrides + [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"])
    got, want = safe_load(run / "checkpoints" / "last.ckpt"), safe_load(full / "checkpoints" / "last.ckpt")
    assert got["global_step"] == want["global_step"] == 8
    for name, value in want["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][name], value, atol=1e-6, rtol=0, msg=lambda m: f"{name}: {m}")
