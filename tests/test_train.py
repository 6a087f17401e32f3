"""train.py / evaluate.py end to end on tiny data with a tiny model: outputs, logging, interop, resume."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from embedlab.data.readers import load_beir
from embedlab.evaluating import evaluate
from embedlab.evaluation.per_query import read_per_query, unit_statistic
from embedlab.evaluation.evaluators import RetrievalEvaluator
from embedlab.models import BiEncoder
from embedlab.models.checkpoint import safe_load
from embedlab.training import train
from tests.conftest import PROJECT_ROOT, compose_config
from tests.wandb_records import logged_run

FAST = ["model=tiny", "trainer.max_epochs=2", "trainer.log_every_n_steps=1", "data.batch_size=4", "data.val_fraction=0.3", "trainer.accelerator=cpu"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data_root):
    """One tiny training run shared by the assertions below (logger=csv to read what was logged)."""
    out = tmp_path_factory.mktemp("train_run")
    cfg = compose_config("train", FAST + [f"data.root={tiny_data_root}", "logger=csv"], out)
    metrics, objects = train(cfg)
    return out, metrics, objects


def test_train_writes_metrics_model_and_checkpoints(trained):
    out, metrics, objects = trained
    written = json.loads((out / "metrics.json").read_text())
    assert written == pytest.approx(metrics)
    for key in ("test/ndcg@10", "test/map@100", "test/mrr@10", "test/recall@100", "test/precision@10", "val/ndcg@10", "train/loss"):
        assert key in written, key
    assert (out / "model" / "modules.json").is_file()
    assert (out / "checkpoints" / "best.ckpt").is_file() and (out / "checkpoints" / "last.ckpt").is_file()


def test_test_metrics_are_the_best_checkpoints(trained, tiny_data_root):
    """test/* in metrics.json equals an independent evaluation of the saved model (the best checkpoint)."""
    out, metrics, objects = trained
    model = BiEncoder.from_pretrained(str(out / "model"))
    task = load_beir(tiny_data_root / "scifact", split="test")
    independent = RetrievalEvaluator(task, k_values=(1, 3, 5, 10, 100), batch_size=8).evaluate(model, show_progress_bar=False)
    for key in ("test/ndcg@10", "test/map@100", "test/mrr@10", "test/recall@100"):
        assert metrics[key] == pytest.approx(independent[key], abs=1e-6)
    best = safe_load(objects["best_checkpoint"])
    saved = model.state_dict()
    for name, value in best["state_dict"].items():
        assert torch.equal(value, saved[name.removeprefix("model.")]), name


def test_validation_logged_per_epoch(trained):
    out, _, _ = trained
    import csv

    rows = list(csv.DictReader((out / "csv" / "metrics.csv").open()))
    val_rows = [r for r in rows if r.get("val/ndcg@10")]
    assert len(val_rows) == 2  # max_epochs=2, one validation per epoch
    assert [int(r["epoch"]) for r in val_rows] == [0, 1]
    assert any(r.get("train/mnrl") for r in rows) and any(r.get("lr-AdamW") for r in rows)


def test_saved_model_loads_in_sentence_transformers(trained):
    from sentence_transformers import SentenceTransformer

    out, _, objects = trained
    texts = ["what do we know about genes?", "Enzymes speed up chemical reactions by lowering activation energy."]
    st = SentenceTransformer(str(out / "model"), device="cpu")
    ours = objects["module"].model.encode(texts)
    assert torch.allclose(torch.as_tensor(st.encode(texts)), ours, atol=1e-5)


def test_evaluate_checkpoint_and_folder_agree(trained, tmp_path, tiny_data_root):
    out, metrics, objects = trained
    results = {}
    for name, path in (("ckpt", objects["best_checkpoint"]), ("folder", out / "model")):
        cfg = compose_config("evaluate", [f"model.path={path}", f"data.root={tiny_data_root}", "logger=none", "progress_bar=false"], tmp_path / name)
        results[name], _ = evaluate(cfg)
        assert json.loads((tmp_path / name / "metrics.json").read_text())["test/ndcg@10"] == pytest.approx(results[name]["test/ndcg@10"])
        # evaluate.py's per-query file beside metrics.json averages to its metrics
        units = read_per_query(tmp_path / name / "test_per_query.jsonl")
        assert unit_statistic(units, "test/ndcg@10") == pytest.approx(results[name]["test/ndcg@10"], abs=1e-9)
    assert results["ckpt"]["test/ndcg@10"] == pytest.approx(results["folder"]["test/ndcg@10"], abs=1e-6)
    assert results["ckpt"]["test/ndcg@10"] == pytest.approx(metrics["test/ndcg@10"], abs=1e-6)


def test_wandb_offline_run_records_config_and_metrics(tmp_path, tiny_data_root, monkeypatch):
    """W&B offline: the run's transaction log holds the composed config, per-epoch val/* rows and test/*."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_config("train", FAST + [f"data.root={tiny_data_root}", "logger=wandb"], tmp_path)
    metrics, _ = train(cfg)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run = logged_run(runs[0])
    assert run["config"]["loss"]["_target_"] == "embedlab.losses.MultipleNegativesRankingLoss"
    assert run["config"]["model"]["_target_"] == "embedlab.models.tiny_bi_encoder"
    val_rows = [row for row in run["history"] if "val/ndcg@10" in row]
    assert [row["epoch"] for row in val_rows] == [0, 1]  # one validation per epoch
    assert val_rows[-1]["val/ndcg@10"] == pytest.approx(metrics["val/ndcg@10"])
    assert any("train/mnrl" in row for row in run["history"])
    assert run["summary"]["test/ndcg@10"] == pytest.approx(metrics["test/ndcg@10"])
    assert run["summary"]["test/map@100"] == pytest.approx(metrics["test/map@100"])


def test_sts_training_with_cosent(tmp_path, tiny_data_root):
    cfg = compose_config(
        "train", ["model=tiny", "experiment=stsb_cosent", "trainer.max_epochs=1", f"data.root={tiny_data_root}", "logger=none"], tmp_path
    )
    metrics, objects = train(cfg)
    assert {"val/spearman_cosine", "test/spearman_cosine", "train/cosent"} <= set(metrics)
    # test/spearman_cosine is the saved model's: scipy's Spearman of its cosine scores against the gold scores
    from scipy.stats import spearmanr

    from embedlab.data.readers import load_sts

    task = load_sts(tiny_data_root / "stsbenchmark" / "sts-test.csv")
    model = BiEncoder.from_pretrained(str(tmp_path / "model"))
    a, b = model.encode(task.sentences1).double(), model.encode(task.sentences2).double()
    cos = torch.nn.functional.cosine_similarity(a, b).numpy()
    assert metrics["test/spearman_cosine"] == pytest.approx(100 * spearmanr(cos, task.scores).statistic, abs=1e-4)


def test_resume_from_last_checkpoint(trained, tmp_path, tiny_data_root):
    """ckpt_path=<run>/checkpoints/last.ckpt continues at the saved step instead of starting over."""
    out, _, objects = trained
    steps_done = objects["trainer"].global_step
    cfg = compose_config(
        "train", FAST + ["trainer.max_epochs=3", f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}", f"data.root={tiny_data_root}", "logger=none"], tmp_path
    )
    _, resumed = train(cfg)
    per_epoch = steps_done // 2
    assert resumed["trainer"].global_step == steps_done + per_epoch


def test_no_validation_split_checkpoints_last(tmp_path, tiny_data_root):
    cfg = compose_config("train", ["model=tiny", "trainer.max_epochs=1", "data.val_fraction=0", f"data.root={tiny_data_root}", "logger=none"], tmp_path)
    metrics, objects = train(cfg)
    assert "test/ndcg@10" in metrics and not any(k.startswith("val/") for k in metrics)
    # nothing to select by: the last step's weights are checkpointed, tested and saved
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "last.ckpt").is_file() and not (checkpoints / "best.ckpt").exists()
    last = safe_load(checkpoints / "last.ckpt")
    assert last["global_step"] == objects["trainer"].global_step
    saved = BiEncoder.from_pretrained(str(tmp_path / "model")).state_dict()
    for name, value in last["state_dict"].items():
        assert torch.equal(value, saved[name.removeprefix("model.")]), name


def test_entry_points_run_as_documented(tmp_path, tiny_data_root):
    """The README's commands, as subprocesses: train.py with Trainer pass-through, then evaluate.py."""
    env_cmd = [sys.executable, "train.py", "model=tiny", f"data.root={tiny_data_root}", f"hydra.run.dir={tmp_path / 'train'}",
               "logger=none", "++trainer.max_steps=2", "data.batch_size=4", "data.val_fraction=0.3"]
    subprocess.run(env_cmd, cwd=PROJECT_ROOT, check=True, capture_output=True)
    train_metrics = json.loads((tmp_path / "train" / "metrics.json").read_text())
    assert "test/ndcg@10" in train_metrics
    eval_cmd = [sys.executable, "evaluate.py", f"model.path={tmp_path / 'train' / 'model'}", "data=stsb", f"data.root={tiny_data_root}",
                f"hydra.run.dir={tmp_path / 'eval'}", "logger=none"]
    subprocess.run(eval_cmd, cwd=PROJECT_ROOT, check=True, capture_output=True)
    assert "test/spearman_cosine" in json.loads((tmp_path / "eval" / "metrics.json").read_text())


@pytest.mark.parametrize("debug", ["fast_dev_run", "limit", "overfit"])
def test_debug_modes_run_end_to_end(debug, tmp_path, tiny_data_root):
    overrides = ["model=tiny", f"debug={debug}", f"data.root={tiny_data_root}", "logger=none", "data.batch_size=4", "data.val_fraction=0.3"]
    if debug == "overfit":
        overrides.append("trainer.max_epochs=2")
    cfg = compose_config("train", overrides, tmp_path)
    metrics, objects = train(cfg)
    trainer = objects["trainer"]
    assert trainer.global_step >= 1
    if debug == "fast_dev_run":
        # one batch of each loop: the evaluation is partial, so no metric is reported rather than a wrong one
        assert not any(k.startswith(("val/", "test/")) for k in metrics)
    else:
        assert "test/ndcg@10" in metrics


def test_adamw_is_fused_where_lightning_allows(trained):
    """Adam/AdamW without fused/foreach gets the fused kernel under 32-bit precision, not under mixed precision
    (Lightning cannot clip a fused optimizer's gradients there), not when the config sets it."""
    import functools

    import lightning as L

    from embedlab.lightning import BiEncoderModule
    from embedlab.losses import MultipleNegativesRankingLoss
    from embedlab.models import tiny_bi_encoder

    _, _, objects = trained
    assert objects["trainer"].optimizers[0].param_groups[0]["fused"] is True  # the real run (32-true, CPU)

    def module(**kw):
        return BiEncoderModule(tiny_bi_encoder(seed=0), MultipleNegativesRankingLoss(), functools.partial(torch.optim.AdamW, lr=1e-3, **kw))

    params = list(module().parameters())
    assert module()._fused_default(params) == {"fused": True}
    assert module(fused=False)._fused_default(params) == {} and module(foreach=True)._fused_default(params) == {}
    mixed = module()
    mixed.trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False)
    assert mixed._fused_default(params) == {}
    sgd = BiEncoderModule(tiny_bi_encoder(seed=0), MultipleNegativesRankingLoss(), functools.partial(torch.optim.SGD, lr=0.1))
    assert sgd._fused_default(params) == {}


def test_lr_multipliers_make_param_groups(tmp_path):
    """module.lr_multipliers: the projection gets factor x lr in its own group, the rest the base lr; the
    warm-up schedule scales both; an unknown prefix is an exact error."""
    import functools

    from embedlab.lightning import BiEncoderModule
    from embedlab.lightning.schedulers import linear_warmup
    from embedlab.losses import MultipleNegativesRankingLoss
    from embedlab.models import tiny_bi_encoder

    adamw = functools.partial(torch.optim.AdamW, lr=1e-4)
    module = BiEncoderModule(tiny_bi_encoder(seed=0, projection_dim=32), MultipleNegativesRankingLoss(), adamw, lr_multipliers={"model.dense": 50})
    groups = module._param_groups()
    assert [g.get("lr") for g in groups] == [5e-3, None]
    assert groups[0]["params"] == [module.model.dense.linear.weight]
    assert len(groups[1]["params"]) == len([p for p in module.parameters()]) - 1
    optimizer = adamw(params=groups)
    scheduler = linear_warmup(optimizer, num_training_steps=10, warmup_steps=2)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.0, 0.0])  # step 0 of a 2-step warm-up
    scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([2.5e-3, 5e-5])

    # the README's override composes into the same groups
    cfg = compose_config("train", ["model=tiny", "model.projection_dim=32", "module.lr_multipliers={model.dense: 50}"], tmp_path)
    from hydra.utils import instantiate

    composed = instantiate(cfg.module, model=instantiate(cfg.model), loss=instantiate(cfg.loss))
    assert [g.get("lr") for g in composed._param_groups()] == [cfg.module.optimizer.lr * 50, None]

    bad = BiEncoderModule(tiny_bi_encoder(seed=0), MultipleNegativesRankingLoss(), adamw, lr_multipliers={"model.dense": 50})
    with pytest.raises(ValueError, match=r"lr_multipliers: no trainable parameter under 'model.dense'; parameter names start with model.transformer"):
        bad._param_groups()
    with pytest.raises(ValueError, match=r"lr_multipliers\['model.dense'\] must be >= 0, got -1.0"):
        BiEncoderModule(tiny_bi_encoder(seed=0), MultipleNegativesRankingLoss(), adamw, lr_multipliers={"model.dense": -1})


@pytest.mark.parametrize("override", ["++trainer.limit_val_batches=2", "++trainer.limit_val_batches=0", "debug=fast_dev_run"])
def test_partial_validation_switches_selection_off_instead_of_crashing(override, tmp_path, tiny_data_root, caplog):
    """Lightning's debugging knobs cut validation short: no val/* metric (part of a corpus would mislead), early
    stopping and best-by-metric checkpointing are switched off with a warning, and the run completes."""
    import logging

    cfg = compose_config("train", FAST + [override, "eval.batch_size=4", f"data.root={tiny_data_root}", "logger=none"], tmp_path)
    with caplog.at_level(logging.WARNING):
        metrics, objects = train(cfg)
    assert not any(k.startswith("val/") for k in metrics)
    assert objects["best_checkpoint"] is None
    if "limit_val_batches" in override:
        reason = override.removeprefix("++trainer.")
        assert f"{reason}: early stopping on val/ndcg@10 is off" in caplog.text
        assert f"{reason}: keeping the last checkpoint instead of the best by val/ndcg@10" in caplog.text
    if override.endswith("=2"):
        assert "val: 7 of 27 rows were computed" in caplog.text  # 2 batches: the 3 queries, 4 of the 24 documents


def test_early_stopping_stops_when_the_metric_stalls(tmp_path, tiny_data_root):
    """lr 0: val/ndcg@10 never improves, so patience=1 stops after epoch 2 of 6 (one epoch to set the best, one
    without improvement)."""
    cfg = compose_config(
        "train",
        FAST + ["trainer.max_epochs=6", "callbacks.early_stopping.patience=1", "module.optimizer.lr=0.0", f"data.root={tiny_data_root}", "logger=none"],
        tmp_path,
    )
    _, objects = train(cfg)
    trainer = objects["trainer"]
    assert trainer.should_stop and trainer.current_epoch == 2
    assert [row["epoch"] for row in objects["module"].validation_history] == [0.0, 1.0]


def test_reported_validation_metrics_are_the_selected_checkpoints(trained):
    """val/* in metrics.json (and the value returned to sweepers) come from the validation the checkpoint chose,
    the best by the monitor, not the last one."""
    out, metrics, objects = trained
    history = objects["module"].validation_history
    best = max(history, key=lambda row: row["val/ndcg@10"])
    assert metrics["val/ndcg@10"] == best["val/ndcg@10"] == pytest.approx(float(objects["trainer"].checkpoint_callback.best_model_score))
    assert metrics["val/best_epoch"] == best["epoch"] and metrics["val/map@100"] == best["val/map@100"]


def test_best_validation_picks_by_mode():
    from embedlab.lightning.base import EmbedlabModule

    module = EmbedlabModule()
    module.validation_history = [{"epoch": 0.0, "val/x": 0.5}, {"epoch": 1.0, "val/x": 0.7}, {"epoch": 2.0, "val/x": 0.6}, {"epoch": 3.0, "val/x": 0.7}]
    assert module.best_validation("val/x", "max")["epoch"] == 1.0  # the first of equal bests, as ModelCheckpoint keeps
    assert module.best_validation("val/x", "min")["epoch"] == 0.0
    assert module.best_validation("val/y") is None


def test_dot_similarity_end_to_end(tmp_path, tiny_data_root):
    """An unnormalized model trained and evaluated with the dot product: the saved folder says "dot" to
    sentence-transformers, and test/* equal pytrec_eval on a naive full-matrix dot-product ranking."""
    import pytrec_eval

    cfg = compose_config(
        "train",
        FAST + ["model.normalize=false", "+model.similarity=dot", "loss.similarity=dot", "loss.scale=1.0", f"data.root={tiny_data_root}", "logger=none"],
        tmp_path,
    )
    metrics, objects = train(cfg)
    config = json.loads((tmp_path / "model" / "config_sentence_transformers.json").read_text())
    assert config["similarity_fn_name"] == "dot"
    model = BiEncoder.from_pretrained(str(tmp_path / "model"))
    assert model.similarity == "dot" and model.normalize is None
    task = load_beir(tiny_data_root / "scifact", split="test")
    qids, dids = list(task.queries), list(task.corpus)
    scores = model.encode([task.queries[q] for q in qids], "query").double() @ model.encode([task.corpus[d] for d in dids]).double().T
    run = {q: {d: float(scores[i, j]) for j, d in enumerate(dids)} for i, q in enumerate(qids)}
    qrels = {q: {d: int(g) for d, g in docs.items()} for q, docs in task.qrels.items()}
    reference = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recip_rank"}).evaluate(run)
    assert metrics["test/ndcg@10"] == pytest.approx(sum(r["ndcg_cut_10"] for r in reference.values()) / len(reference), abs=1e-6)


def test_non_finite_loss_stops_with_step_and_term(tmp_path, tiny_data_root):
    """A NaN loss stops the run at its first step with the step and the term named; no checkpoint is written."""
    from embedlab.lightning import NonFiniteLossError

    cfg = compose_config("train", FAST + ["loss.scale=nan", f"data.root={tiny_data_root}", "logger=none"], tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"^step 0: non-finite loss terms mnrl=nan, loss=nan \(no update or checkpoint was made"):
        train(cfg)
    assert not list((tmp_path / "checkpoints").glob("*.ckpt"))
    assert not (tmp_path / "model").exists() and not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize("form", ["file", "pairs_with_inline_test"])
def test_evaluate_a_scored_file_needs_no_training_path(form, tmp_path, tiny_data_root):
    """evaluate.py on a CSV of scored pairs: STS metrics of exactly that file, with no data.train path; both the
    documented `data=file` form and an inline data.test on `data=pairs` (whose train path stays unset)."""
    from scipy.stats import spearmanr

    from tests.conftest import TOPICS

    rows = [(TOPICS[i][1], TOPICS[(i * 5 + 1) % len(TOPICS)][1], float((i * 7) % 11) / 2) for i in range(10)]
    table = tmp_path / "scored.csv"
    table.write_text("sentence1,sentence2,score\n" + "".join(f'"{a}","{b}",{s}\n' for a, b, s in rows))
    if form == "file":
        data = ["data=file", f"data.test.path={table}", "data.test.kind=scored", "data.test.score_scale=5"]
    else:
        data = ["data=pairs", f"data.test={{_target_: embedlab.data.TableSource, path: '{table}', kind: scored, score_scale: 5}}"]
    cfg = compose_config("evaluate", ["model=tiny", *data, "logger=none", "progress_bar=false"], tmp_path / "eval")
    metrics, objects = evaluate(cfg)
    model = objects["model"]
    a = model.encode([r[0] for r in rows]).double()
    b = model.encode([r[1] for r in rows]).double()
    cos = torch.nn.functional.cosine_similarity(a, b).numpy()
    assert metrics["test/spearman_cosine"] == pytest.approx(100 * spearmanr(cos, [r[2] for r in rows]).statistic, abs=1e-4)
