"""Every config file composes, and every object in it instantiates (tiny model, tiny data)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from embedlab.data import EmbeddingDataModule
from embedlab.models import BiEncoder
from embedlab.training import instantiate_list
from tests.conftest import CONFIG_DIR, compose_config


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def test_every_config_file_is_covered():
    """A new config group or file must be added to the tests below (this list is the contract)."""
    covered = {"model", "pooling", "loss", "data", "trainer", "logger", "callbacks", "paths", "hydra", "debug", "experiment", "hparams_search", "launcher", "rotation"}
    groups = {p.name for p in CONFIG_DIR.iterdir() if p.is_dir()}
    assert groups == covered
    assert {p.stem for p in CONFIG_DIR.glob("*.yaml")} == {"train", "evaluate", "mine"}


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
    assert isinstance(encoder, BiEncoder)
    if model == "hf":
        assert encoder.pooling.mode == "cls"  # pooling=auto reads the folder's 1_Pooling config
    if model == "minilm_l6":
        assert encoder.embedding_dim == 384 and encoder.max_seq_length == {"query": 256, "document": 256}


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
    from embedlab.losses import EmbeddedBatch

    g = torch.Generator().manual_seed(0)
    batch = EmbeddedBatch(
        query=torch.randn(4, 8, generator=g, requires_grad=True),
        positive=torch.randn(4, 8, generator=g),
        negatives=torch.randn(4, 1, 8, generator=g),
        scores=torch.tensor([1.0, 0.0, 0.5, 1.0]),
    )
    terms = fn(batch)
    assert terms["loss"].ndim == 0 and torch.isfinite(terms["loss"])
    terms["loss"].backward()
    assert batch.query.grad is not None


@pytest.mark.parametrize("data", options("data"))
def test_data_configs(data, tmp_path, tiny_data_root):
    overrides = ["model=tiny", f"data={data}", f"data.root={tiny_data_root}"]
    if data == "beir":
        overrides.append("data.name=scifact")
    if data == "pairs":
        table = tmp_path / "pairs.jsonl"
        table.write_text("".join(f'{{"query": "q{i}", "positive": "p{i}"}}\n' for i in range(10)))
        overrides.append(f"data.train.path={table}")
    cfg = compose_config("train", overrides, tmp_path)
    dm = instantiate(cfg.data)
    assert isinstance(dm, EmbeddingDataModule)
    dm.setup("fit")
    assert len(dm.train_examples) > 0 and dm.val_evaluator is not None
    batch = next(iter(dm.train_dataloader()))
    if data.startswith("mixture"):
        # one dataset per step, each with its own batch size
        sizes = [d.get("batch_size") or cfg.data.batch_size for d in cfg.data.train.datasets.values()]
        assert 1 <= len(batch["query"]) <= max(sizes) and batch["dataset"] in cfg.data.train.datasets
    else:
        assert len(batch["query"]) == min(cfg.data.batch_size, len(dm.train_examples))
    if data == "stsb":
        assert batch["scores"] is not None and 0 <= float(batch["scores"].min()) <= float(batch["scores"].max()) <= 1


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


@pytest.mark.parametrize("name", options("logger"))
def test_logger_configs(name, tmp_path, tiny_data_root):
    cfg = compose_config("train", ["model=tiny", f"logger={name}", f"data.root={tiny_data_root}"], tmp_path)
    loggers = instantiate_list(cfg.get("logger"))
    assert len(loggers) == (0 if name == "none" else 1)
    if name == "wandb":
        assert cfg.logger.wandb.offline is True  # no credentials here


@pytest.mark.parametrize("name", options("callbacks"))
def test_callback_configs(name, tmp_path, tiny_data_root):
    cfg = compose_config("train", ["model=tiny", f"callbacks={name}", f"data.root={tiny_data_root}"], tmp_path)
    callbacks = instantiate_list(cfg.get("callbacks"))
    assert len(callbacks) == len(cfg.get("callbacks") or {})


@pytest.mark.parametrize("name", options("rotation"))
def test_rotation_configs(name, tmp_path, tiny_data_root):
    from embedlab.rotation import MatryoshkaRotation

    cfg = compose_config("train", ["model=tiny", f"rotation={name}", f"data.root={tiny_data_root}"], tmp_path)
    rotation = instantiate(cfg.rotation)
    assert isinstance(rotation, MatryoshkaRotation)
    assert rotation.dims == list(cfg.rotation.loss.dims) and rotation.encode_batch_size == cfg.eval.batch_size
    assert compose_config("train", ["model=tiny", f"data.root={tiny_data_root}"], tmp_path).get("rotation") is None


@pytest.mark.parametrize("name", options("experiment"))
def test_experiment_configs(name, tmp_path, tiny_data_root):
    cfg = compose_config("train", ["model=tiny", f"experiment={name}", f"data.root={tiny_data_root}"], tmp_path)
    instantiate(cfg.loss)
    instantiate(cfg.data).setup("fit")
    assert cfg.task_name == name
    if name == "rotation_scifact":
        assert cfg.rotation.loss.dims == cfg.eval.dims and cfg.model.projection_dim == 384


@pytest.mark.parametrize("name", options("hparams_search") + options("launcher"))
def test_sweep_and_launcher_configs(name, tmp_path, tiny_data_root):
    group = "hparams_search" if name in options("hparams_search") else "launcher"
    cfg = compose_config("train", ["model=tiny", f"{group}={name}", f"data.root={tiny_data_root}"], tmp_path)
    assert OmegaConf.select(cfg, "task_name") == "train"


def test_evaluate_config_composes_with_every_data_option(tmp_path, tiny_data_root):
    for data in ("scifact", "stsb"):
        cfg = compose_config("evaluate", ["model=tiny", f"data={data}", f"data.root={tiny_data_root}"], tmp_path)
        assert instantiate(cfg.data).test_source.task() is not None


def test_paths_default_data_root(tmp_path, monkeypatch):
    monkeypatch.delenv("EMBEDLAB_DATA", raising=False)
    cfg = compose_config("train", ["model=tiny"], tmp_path)
    expected = Path(cfg.paths.root_dir).parent / "shared" / "data"
    assert cfg.paths.data_root == str(expected if expected.is_dir() else Path(cfg.paths.root_dir) / "data")
    monkeypatch.setenv("EMBEDLAB_DATA", "/some/where")
    assert compose_config("train", ["model=tiny"], tmp_path).data.root == "/some/where"
