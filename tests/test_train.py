"""train.py / evaluate.py end to end on tiny data with a tiny model: outputs, logging, interop, resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from embedlab.data.readers import load_beir
from embedlab.evaluating import evaluate
from embedlab.evaluation.evaluators import RetrievalEvaluator
from embedlab.models import BiEncoder
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
    best = torch.load(objects["best_checkpoint"], map_location="cpu", weights_only=False)
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
    metrics, _ = train(cfg)
    assert {"val/spearman_cosine", "test/spearman_cosine", "train/cosent"} <= set(metrics)
    assert -100 <= metrics["test/spearman_cosine"] <= 100


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
    (Lightning cannot clip a fused optimizer's gradients there), not when the config sets it; the fused update
    equals torch's for-loop one."""
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

    # one step from the same gradients: fused == for-loop (float rounding)
    results = []
    for kw in ({"fused": True}, {"foreach": False}):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(7, 5)) for _ in range(3)]
        for p in ps:
            p.grad = torch.randn_like(p)
        opt = torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01, **kw)
        for _ in range(3):
            opt.step()
        results.append(torch.cat([p.detach().flatten() for p in ps]))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-6)


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
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([2.5e-3, 5e-5])  # step 0 of a 2-step warm-up
    scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([5e-3, 1e-4])

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
