"""Every config file composes, and every object in it instantiates with the values the file says (tiny model, tiny data)."""

from __future__ import annotations

import json

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from embedlab.data import DataError, EmbeddingDataModule, RetrievalTask, STSTask
from embedlab.evaluation.evaluators import RetrievalEvaluator, STSEvaluator
from embedlab.lightning import BiEncoderModule
from embedlab.models import BiEncoder
from embedlab.training import instantiate_list
from tests.conftest import CONFIG_DIR, compose_config


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def test_every_config_file_is_covered():
    """A new config group or file must be added to the tests below (this list is the contract)."""
    covered = {
        "model", "pooling", "module", "loss", "data", "eval", "post_fit", "trainer", "logger", "callbacks", "paths", "hydra",
        "debug", "experiment", "hparams_search", "launcher", "retriever", "rerank",
    }  # fmt: skip
    groups = {p.name for p in CONFIG_DIR.iterdir() if p.is_dir()}
    assert groups == covered
    assert {p.stem for p in CONFIG_DIR.glob("*.yaml")} == {"train", "evaluate", "mine", "score"}  # score: tests/test_scoring.py


@pytest.mark.parametrize("pooling", options("pooling"))
def test_pooling_configs(pooling, tmp_path, tiny_data_root):
    cfg = compose_config("train", ["model=tiny", f"pooling={pooling}", f"data.root={tiny_data_root}"], tmp_path)
    model = instantiate(cfg.model)
    assert isinstance(model, BiEncoder)
    assert model.pooling.mode == ("mean" if pooling == "auto" else pooling)


@pytest.mark.parametrize("model", options("model"))
def test_model_configs(model, tmp_path, tiny_data_root, monkeypatch):
    overrides = [f"model={model}", f"data.root={tiny_data_root}"]
    if model == "hf":
        # a local folder stands in for a Hub id: the tiny model saved in sentence-transformers format
        from embedlab.models import tiny_bi_encoder

        folder = tiny_bi_encoder(pooling="cls").save(tmp_path / "hf_model")
        overrides.append(f"model.path={folder}")
    if model == "minilm_l3":
        shared = tmp_path / "shared"
        shared.mkdir()
        monkeypatch.setenv("EMBEDLAB_SHARED", str(shared))
    cfg = compose_config("train", overrides, tmp_path)
    if model == "minilm_l3":
        # the folder comes from $EMBEDLAB_SHARED; without the real one, check the path it resolves to
        assert cfg.model.path == f"{tmp_path / 'shared'}/models/paraphrase-MiniLM-L3-v2"
        assert cfg.model.max_seq_length == 128
        return
    encoder = instantiate(cfg.model)
    if model.startswith("cross_encoder"):
        from embedlab.models import CrossEncoder

        # a scoring head on the encoder: one logit, sigmoid in predict, as sentence-transformers' CrossEncoder
        assert isinstance(encoder, CrossEncoder) and encoder.num_labels == 1 and encoder.activation == "sigmoid"
        assert encoder.max_length == (256 if model == "cross_encoder_minilm_l6" else 64)
        return
    assert isinstance(encoder, BiEncoder)
    if model == "hf":
        assert encoder.pooling.mode == "cls"  # pooling=auto reads the folder's 1_Pooling config
    if model == "minilm_l6":
        assert encoder.embedding_dim == 384 and encoder.max_seq_length == {"query": 256, "document": 256}
    if model == "student_l3":
        # layers 0, 2, 4 of all-MiniLM-L6-v2, recorded so a checkpoint rebuilds the same student
        assert len(encoder.transformer.backbone.encoder.layer) == 3 and encoder.transformer.backbone.config.num_hidden_layers == 3
        assert encoder.config["layers"] == [0, 2, 4] and encoder.config["_target_"] == "embedlab.models.student.layer_reduced"


def test_new_model_and_matryoshka_options_compose(tmp_path, tiny_data_root):
    """model.fast_cpu_dropout (on by default, off by override) and loss.distill_weight from the command line."""
    from embedlab.models.cpu_dropout import ATTN_IMPLEMENTATION, FastDropout

    for flag, attn in (("true", ATTN_IMPLEMENTATION), ("false", "sdpa")):
        cfg = compose_config("train", [f"model.fast_cpu_dropout={flag}", f"data.root={tiny_data_root}"], tmp_path)
        backbone = instantiate(cfg.model).transformer.backbone
        assert backbone.config._attn_implementation == attn
        assert any(isinstance(m, FastDropout) for m in backbone.modules()) == (flag == "true")
    cfg = compose_config(
        "train",
        ["model=tiny", "loss=matryoshka", "loss.dims=[8,4]", "loss.distill_weight=0.5", "loss.distill_temperature=2",
         f"data.root={tiny_data_root}"],
        tmp_path,
    )  # fmt: skip
    fn = instantiate(cfg.loss)
    assert (fn.distill_weight, fn.distill_temperature) == (0.5, 2.0)
    g = torch.Generator().manual_seed(0)
    q, p = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    from embedlab.losses import EmbeddedBatch

    assert "distill@dim4" in fn(EmbeddedBatch(query=q, positive=p))


@pytest.mark.parametrize("loss", options("loss"))
def test_loss_configs(loss, tmp_path, tiny_data_root):
    overrides = ["model=tiny", f"loss={loss}", f"data.root={tiny_data_root}"]
    if loss == "matryoshka":
        overrides.append("loss.dims=[8,4,2]")
    cfg = compose_config("train", overrides, tmp_path)
    fn = instantiate(cfg.loss)
    from embedlab.losses import EmbeddedBatch, ScoredCandidates

    g = torch.Generator().manual_seed(0)
    from embedlab.losses import DistillationLoss

    if isinstance(fn, DistillationLoss):
        # distillation: student/teacher embeddings of every text, the pairs' candidate scores with teacher scores
        from embedlab.losses.distillation import DistillationBatch

        query = torch.randn(4, 8, generator=g, requires_grad=True)
        embedded = EmbeddedBatch(query=query, positive=torch.randn(4, 8, generator=g), negatives=torch.randn(4, 2, 8, generator=g))
        batch = DistillationBatch(
            embedded=embedded, student=query * 2, teacher=torch.randn(4, 8, generator=g), teacher_scores=torch.randn(4, 3, generator=g)
        )
        terms = fn(batch)
        assert terms["loss"].ndim == 0 and torch.isfinite(terms["loss"])
        want = {"distill_mse": {"embedding_mse"}, "distill_kl": {"kl", "mnrl"}, "distill_margin_mse": {"margin_mse", "mnrl"}}[loss]
        assert set(terms) == want | {"loss"}
        terms["loss"].backward()
        assert float(query.grad.abs().sum()) > 0
        return
    if getattr(fn, "consumes", None) == "scores":
        # cross-encoder losses: (B, 1 + n) scores of each query's positive and negatives, teacher scores for margin-MSE
        scores = torch.randn(4, 3, generator=g, requires_grad=True)
        labels = torch.tensor([[1.0, 0.0, 0.0]] * 4)
        terms = fn(ScoredCandidates(scores=scores, labels=labels, teacher_scores=torch.randn(4, 3, generator=g)))
        assert terms["loss"].ndim == 0 and torch.isfinite(terms["loss"])
        terms["loss"].backward()
        assert float(scores.grad.abs().sum()) > 0
        return
    batch = EmbeddedBatch(
        query=torch.randn(4, 8, generator=g, requires_grad=True),
        positive=torch.randn(4, 8, generator=g),
        negatives=torch.randn(4, 1, 8, generator=g),
        scores=torch.tensor([1.0, 0.0, 0.5, 1.0]),
    )
    terms = fn(batch)
    assert terms["loss"].ndim == 0 and torch.isfinite(terms["loss"])
    terms["loss"].backward()
    assert batch.query.grad is not None and float(batch.query.grad.abs().sum()) > 0


@pytest.mark.parametrize("data", options("data"))
def test_data_configs(data, tmp_path, tiny_data_root):
    overrides = ["model=tiny", f"data={data}", f"data.root={tiny_data_root}"]
    if data == "beir":
        overrides.append("data.name=scifact")
    table = tmp_path / "pairs.jsonl"
    table.write_text("".join(f'{{"query": "q{i}", "positive": "p{i}"}}\n' for i in range(10)))
    if data == "pairs":
        overrides.append(f"data.train.path={table}")
    if data == "file":
        overrides.append(f"data.test.path={table}")
    cfg = compose_config("train", overrides, tmp_path)
    dm = instantiate(cfg.data)
    assert isinstance(dm, EmbeddingDataModule)
    if data in ("file", "base"):
        # evaluation only: no training source; its test task is the file's pairs (or none for the bare base)
        if data == "file":
            task = dm.load_test_task()
            assert sorted(task.queries.values()) == sorted(f"q{i}" for i in range(10))
        with pytest.raises(DataError, match="data.train is not set: training needs a train source"):
            dm.setup("fit")
        return
    dm.setup("fit")
    assert len(dm.train_examples) > 0
    assert isinstance(dm.val_task, STSTask if data == "stsb" else RetrievalTask)
    assert cfg.monitor == ("val/spearman_cosine" if data == "stsb" else "val/ndcg@10")
    batch = next(iter(dm.train_dataloader()))
    if data.startswith("mixture"):
        # one dataset per step, each with its own batch size
        sizes = [d.get("batch_size") or cfg.data.batch_size for d in cfg.data.train.datasets.values()]
        assert 1 <= len(batch["query"]) <= max(sizes) and batch["dataset"] in cfg.data.train.datasets
    elif data == "distill_texts":
        # unlabelled texts: queries and documents of one batch, no pairs; validation on the training queries' qrels
        assert batch["paired"] is False and batch["negatives"] is None
        assert len(batch["query"]) + len(batch["positive"]) == min(cfg.data.batch_size, len(dm.train_examples))
        assert not set(dm.load_test_task().queries.values()) & {e.query for e in dm.train_examples}
    else:
        assert len(batch["query"]) == min(cfg.data.batch_size, len(dm.train_examples))
    if data == "stsb":
        assert batch["scores"] is not None and 0 <= float(batch["scores"].min()) <= float(batch["scores"].max()) <= 1


@pytest.mark.parametrize("name", options("module"))
def test_module_configs(name, tmp_path, tiny_data_root):
    """The module gets the optimizer, schedule and the `eval` options it builds its evaluators from."""
    if name == "cross_encoder":
        from embedlab.evaluation.first_stage import BM25Retriever
        from embedlab.evaluation.rerank import RerankEvaluator
        from embedlab.lightning import CrossEncoderModule

        overrides = ["model=cross_encoder_tiny", "module=cross_encoder", "loss=listwise", "eval.k_values=[1,10]", "rerank.top_k=50"]
        cfg = compose_config("train", overrides + [f"data.root={tiny_data_root}"], tmp_path)
        module = instantiate(cfg.module, model=instantiate(cfg.model), loss=instantiate(cfg.loss))
        assert isinstance(module, CrossEncoderModule) and isinstance(module.first_stage, BM25Retriever)
        dm = instantiate(cfg.data)
        dm.setup("fit")
        val, test = module.build_evaluator(dm.val_task, stage="val"), module.build_evaluator(dm.val_task, stage="test")
        assert isinstance(val, RerankEvaluator) and val.k_values == (1, 10) and val.first_stage is module.first_stage
        assert (val.top_k, test.top_k) == (cfg.module.val_top_k, 50)
        return
    overrides = ["model=tiny", f"module={name}", "eval.k_values=[1,10]", f"data.root={tiny_data_root}"]
    if name == "distillation":
        # the default teacher is all-MiniLM-L6-v2 (384-d): a 32-d tiny student gets a learned projection to it
        overrides += ["loss=distill_mse", f"module.teacher_cache_dir={tmp_path / 'cache'}"]
    cfg = compose_config("train", overrides, tmp_path)
    module = instantiate(cfg.module, model=instantiate(cfg.model), loss=instantiate(cfg.loss))
    assert isinstance(module, BiEncoderModule)
    if name == "distillation":
        assert module.teacher.embedding_dim == 384 and module.projection.weight.shape == (384, 32)
    assert module.optimizer_factory.keywords["lr"] == cfg.module.optimizer.lr
    assert module.evaluation_options["k_values"] == [1, 10]
    dm = instantiate(cfg.data)
    dm.setup("fit")
    evaluator = module.build_evaluator(dm.val_task)
    assert isinstance(evaluator, RetrievalEvaluator) and evaluator.k_values == (1, 10)
    assert evaluator.similarity == module.model.similarity  # eval.similarity null: the model's


@pytest.mark.parametrize("name", options("eval"))
def test_eval_configs(name, tmp_path, tiny_data_root):
    from embedlab.evaluation.evaluators import build_evaluator

    cfg = compose_config("evaluate", ["model=tiny", f"eval={name}", "eval.similarity=dot", f"data.root={tiny_data_root}"], tmp_path)
    task = instantiate(cfg.data.test).task()
    evaluator = build_evaluator(task, **OmegaConf.to_container(cfg.eval))
    assert isinstance(evaluator, RetrievalEvaluator)
    assert evaluator.k_values == tuple(cfg.eval.k_values) and evaluator.similarity == "dot"
    sts = compose_config("evaluate", ["model=tiny", f"eval={name}", "eval.similarity=cos", "data=stsb", f"data.root={tiny_data_root}"], tmp_path)
    assert isinstance(build_evaluator(instantiate(sts.data.test).task(), **OmegaConf.to_container(sts.eval)), STSEvaluator)


@pytest.mark.parametrize("name", options("trainer") + options("debug"))
def test_trainer_and_debug_configs(name, tmp_path, tiny_data_root):
    group = "trainer" if name in options("trainer") else "debug"
    if name == "gpu" and not torch.cuda.is_available():
        cfg = compose_config("train", ["model=tiny", "trainer=gpu", f"data.root={tiny_data_root}"], tmp_path)
        assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
        return
    cfg = compose_config("train", ["model=tiny", f"{group}={name}", f"data.root={tiny_data_root}"], tmp_path)
    trainer = instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
    assert trainer.max_epochs == cfg.trainer.max_epochs
    if group == "debug" and name == "fast_dev_run":
        assert trainer.fast_dev_run


@pytest.mark.parametrize("name", options("logger"))
def test_logger_configs(name, tmp_path, tiny_data_root):
    cfg = compose_config("train", ["model=tiny", f"logger={name}", f"data.root={tiny_data_root}"], tmp_path)
    loggers = instantiate_list(cfg.get("logger"))
    assert len(loggers) == (0 if name == "none" else 1)
    if name == "wandb":
        assert cfg.logger.wandb.offline is True  # no credentials here


@pytest.mark.parametrize("name", options("callbacks"))
def test_callback_configs(name, tmp_path, tiny_data_root):
    from lightning.pytorch.callbacks import ModelCheckpoint

    cfg = compose_config("train", ["model=tiny", f"callbacks={name}", "data=stsb", f"data.root={tiny_data_root}"], tmp_path)
    callbacks = instantiate_list(cfg.get("callbacks"))
    assert len(callbacks) == len([c for c in (cfg.get("callbacks") or {}).values() if c])
    # the best checkpoint follows the data config's validation metric
    assert {cb.monitor for cb in callbacks if isinstance(cb, ModelCheckpoint) and cb.monitor} <= {"val/spearman_cosine"}


@pytest.mark.parametrize("name", options("post_fit"))
def test_post_fit_configs(name, tmp_path, tiny_data_root):
    cfg = compose_config("train", ["model=tiny", f"post_fit={name}", "eval.batch_size=7", f"data.root={tiny_data_root}"], tmp_path)
    stages = instantiate_list(cfg.post_fit)
    assert len(stages) == 1 and callable(stages[0].run)
    assert stages[0].dims == list(cfg.post_fit.rotation.loss.dims) and stages[0].encode_batch_size == 7
    assert compose_config("train", ["model=tiny", f"data.root={tiny_data_root}"], tmp_path).get("post_fit") is None


@pytest.mark.parametrize("name", options("experiment"))
def test_experiment_configs(name, tmp_path, tiny_data_root):
    # model=tiny on the command line would replace the experiment's student (composed here, not built)
    overrides = ([] if name == "distill_minilm_l3" else ["model=tiny"]) + [f"experiment={name}", f"data.root={tiny_data_root}"]
    if name == "distill_scores_scifact":
        # the experiment needs a file of teacher-scored negatives (python score.py): one per training query here
        from embedlab.data.readers.beir import load_beir

        task = load_beir(tiny_data_root / "scifact", split="train")
        lines = []
        for qid, rel in task.qrels.items():
            negative = next(d for d in task.corpus if d not in rel)
            lines.append(json.dumps({"query_id": qid, "negative_ids": [negative], "teacher_scores": {negative: 0.5, **{d: 2.0 for d in rel}}}))
        (tmp_path / "scored.jsonl").write_text("\n".join(lines) + "\n")
        overrides.append(f"data.train.hard_negatives={tmp_path / 'scored.jsonl'}")
    cfg = compose_config("train", overrides, tmp_path)
    loss = instantiate(cfg.loss)
    instantiate(cfg.data).setup("fit")
    assert cfg.task_name == name
    if name == "rotation_scifact":
        assert cfg.post_fit.rotation.loss.dims == cfg.eval.dims and cfg.model.projection_dim == 384
    if name == "mixture_example":
        from embedlab.losses import CoSENTLoss, MultipleNegativesRankingLoss

        assert isinstance(loss.loss_for("stsb"), CoSENTLoss)
        assert isinstance(loss.loss_for("scifact"), MultipleNegativesRankingLoss)
    if name == "stsb_cosent":
        assert cfg.monitor == "val/spearman_cosine"
    if name.startswith("distill"):
        from embedlab.losses import DistillationLoss

        assert cfg.module._target_ == "embedlab.lightning.DistillationModule" and isinstance(loss, DistillationLoss)
    if name == "distill_minilm_l3":
        assert cfg.model.layers == [0, 2, 4] and loss.needs_teacher_embeddings and cfg.trainer.max_epochs >= 1
    if name.startswith("cross_encoder"):
        from embedlab.lightning import CrossEncoderModule

        cfg = compose_config("train", [f"experiment={name}", "model=cross_encoder_tiny", f"data.root={tiny_data_root}"], tmp_path)
        assert isinstance(instantiate(cfg.module, model=instantiate(cfg.model), loss=loss), CrossEncoderModule)
        assert cfg.monitor == ("val/spearman" if name == "cross_encoder_stsb" else "val/ndcg@10")


@pytest.mark.parametrize("name", options("rerank"))
def test_rerank_configs(name, tmp_path, tiny_data_root):
    """evaluate.py's second stage: no reranker by default; its top_k / batch size feed the two-stage evaluator."""
    from embedlab.evaluating import two_stage
    from embedlab.evaluation.rerank import RerankEvaluator
    from embedlab.models import tiny_cross_encoder

    folder = tiny_cross_encoder().save(tmp_path / "ce")
    cfg = compose_config("evaluate", [f"rerank={name}", "retriever=bm25", f"data.root={tiny_data_root}"], tmp_path)
    assert cfg.rerank.model is None and cfg.rerank.top_k == 100
    cfg.rerank.model, cfg.rerank.top_k = str(folder), 7
    evaluator, model = two_stage(cfg, instantiate(cfg.data.test).task(), torch.device("cpu"))
    assert isinstance(evaluator, RerankEvaluator) and evaluator.top_k == 7 and evaluator.batch_size == cfg.rerank.batch_size
    assert model.max_length == 64  # max_length null: the folder's


@pytest.mark.parametrize("name", options("hparams_search") + options("launcher"))
def test_sweep_and_launcher_configs(name, tmp_path, tiny_data_root):
    group = "hparams_search" if name in options("hparams_search") else "launcher"
    cfg = compose_config("train", ["model=tiny", f"{group}={name}", f"data.root={tiny_data_root}"], tmp_path, keep_hydra=True)
    if group == "hparams_search":
        params = cfg.hydra.sweeper.params
        assert params and all(OmegaConf.select(cfg, key, default="missing") != "missing" for key in params)
    else:
        target = cfg.hydra.launcher._target_
        assert target.startswith("hydra_plugins.hydra_submitit_launcher")
        module_name, cls_name = target.rsplit(".", 1)
        import importlib

        assert hasattr(importlib.import_module(module_name), cls_name)


def test_evaluate_config_composes_with_every_data_option(tmp_path, tiny_data_root):
    """evaluate.py builds only data.test: its task is the split's (3 test queries; 12 STS pairs), no train path needed."""
    expected = {"scifact": (RetrievalTask, 3), "stsb": (STSTask, 12)}
    for data, (kind, size) in expected.items():
        cfg = compose_config("evaluate", ["model=tiny", f"data={data}", f"data.root={tiny_data_root}"], tmp_path)
        task = instantiate(cfg.data.test).task()
        assert isinstance(task, kind)
        assert (len(task.queries) if kind is RetrievalTask else len(task.scores)) == size


def test_paths_default_data_root(tmp_path, monkeypatch):
    """data_root: $EMBEDLAB_DATA, else ../shared/data beside the project folder, else <project>/data."""
    monkeypatch.delenv("EMBEDLAB_DATA", raising=False)
    with_shared, without = tmp_path / "a" / "proj", tmp_path / "b" / "proj"
    (tmp_path / "a" / "shared" / "data").mkdir(parents=True)
    without.mkdir(parents=True)
    for root, expected in ((with_shared, tmp_path / "a" / "shared" / "data"), (without, without / "data")):
        cfg = compose_config("train", ["model=tiny"], tmp_path)
        with open_dict(cfg):
            cfg.paths.root_dir = str(root)
        assert Path(cfg.data.root) == expected
    monkeypatch.setenv("EMBEDLAB_DATA", "/some/where")
    assert compose_config("train", ["model=tiny"], tmp_path).data.root == "/some/where"
