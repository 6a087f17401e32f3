"""Checkpoint loading runs no code the file names, and rebuilds the trained model with the caller's options.

Each hostile checkpoint comes with a control showing its payload is live (it DOES create the marker file
through ``torch.load(weights_only=False)`` or ``hydra.utils.instantiate``, what embedlab used to call), so
the safe path not creating it is meaningful.
"""

from __future__ import annotations

import copy
import os
import pathlib
import re

import pytest
import torch

from embedlab.errors import UserError
from embedlab.models import BiEncoder, ModelLoadError, Pooling, load_checkpoint, safe_load, tiny_bi_encoder

TEXTS = [
    "Proteins fold into three dimensional structures that determine their function.",
    "hi",
    "what do we know about vaccines and the immune response they train before an infection?",
]


class TouchOnUnpickle:
    """Unpickling this runs ``pathlib.Path(marker).touch()``: the shape of a malicious pickle payload."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _trained_like(**kwargs) -> BiEncoder:
    """A tiny model whose weights differ from its seed's initialization (so a rebuild that skipped the
    checkpoint's weights would give other embeddings)."""
    model = tiny_bi_encoder(seed=0, **kwargs)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _write_checkpoint(path: pathlib.Path, model: BiEncoder, model_cfg=None, **extra) -> pathlib.Path:
    """What a Lightning checkpoint of the bi-encoder module holds: ``model.``-prefixed weights + the model config."""
    checkpoint = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "embedlab_model_cfg": model.config if model_cfg is None else model_cfg,
        "epoch": 0,
        "global_step": 3,
        **extra,
    }
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model = _trained_like(query_max_seq_length=12, document_max_seq_length=24, query_prompt="q: ")
    path = _write_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.ckpt", model)
    return model, path


# ---------------------------------------------------------------------------------------- no code runs
def test_pickled_payload_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = _write_checkpoint(tmp_path / "evil.ckpt", tiny_bi_encoder(seed=0), payload=TouchOnUnpickle(marker))
    with pytest.raises(ModelLoadError, match=r"refused: it stores Python objects \(.*pathlib\..*\).*could run arbitrary code"):
        BiEncoder.from_pretrained(str(ckpt))
    with pytest.raises(ModelLoadError):
        safe_load(ckpt)
    assert not marker.exists()
    # control: the unrestricted unpickler runs the payload
    torch.load(ckpt, weights_only=False)
    assert marker.exists()


def test_model_config_naming_os_system_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    cfg = {"_target_": "os.system", "command": f"touch {marker}"}
    ckpt = _write_checkpoint(tmp_path / "cfg.ckpt", tiny_bi_encoder(seed=0), model_cfg=cfg)
    with pytest.raises(
        ModelLoadError,
        match=re.escape(
            f"checkpoint {str(ckpt)!r}: its model config names _target_ 'os.system', which is not an embedlab model "
            "constructor (embedlab.models.BiEncoder.from_pretrained, "
        ),
    ):
        load_checkpoint(ckpt)
    assert not marker.exists()


def test_model_config_target_that_instantiate_would_run_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    cfg = {"_target_": "pathlib.Path.touch", "_args_": [{"_target_": "pathlib.Path", "_args_": [str(marker)]}]}
    ckpt = _write_checkpoint(tmp_path / "cfg.ckpt", tiny_bi_encoder(seed=0), model_cfg=cfg)
    with pytest.raises(ModelLoadError, match=r"names _target_ 'pathlib.Path.touch', which is not an embedlab model constructor"):
        BiEncoder.from_pretrained(str(ckpt))
    assert not marker.exists()
    # control: what embedlab used to do with the stored config (hydra's instantiate) creates the file
    from hydra.utils import instantiate

    instantiate(cfg)
    assert marker.exists()


def test_nested_target_outside_allow_list_is_refused(tmp_path):
    """An allowed builder with a hostile nested object (where a pooling config would sit) is refused too."""
    marker = tmp_path / "pwned"
    model = tiny_bi_encoder(seed=0)
    cfg = {**model.config, "pooling": {"_target_": "os.system", "command": f"touch {marker}"}}
    ckpt = _write_checkpoint(tmp_path / "nested.ckpt", model, model_cfg=cfg)
    with pytest.raises(ModelLoadError, match=r"names _target_ 'os.system', which is not an embedlab model part"):
        load_checkpoint(ckpt)
    assert not marker.exists()


def test_trust_remote_code_from_a_checkpoint_needs_the_callers_consent(tmp_path):
    model = tiny_bi_encoder(seed=0)
    ckpt = _write_checkpoint(tmp_path / "remote.ckpt", model, model_cfg={**model.config, "trust_remote_code": True})
    with pytest.raises(ModelLoadError, match=r"was built with trust_remote_code=true .* set model.trust_remote_code=true"):
        BiEncoder.from_pretrained(str(ckpt))


def test_checkpoint_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match=r"checkpoint '.*missing.ckpt' does not exist"):
        BiEncoder.from_pretrained(str(tmp_path / "missing.ckpt"))
    no_cfg = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}}, no_cfg)
    with pytest.raises(UserError, match=r"was not written by embedlab train.py \(no embedlab_model_cfg\)"):
        BiEncoder.from_pretrained(str(no_cfg))


# ---------------------------------------------------------------------------------------- rebuild
def test_rebuilt_model_equals_the_trained_one(trained):
    """Weights, settings and embeddings of the rebuilt model == the model that wrote the checkpoint; the
    seed's fresh model embeds differently (the weights really come from the checkpoint)."""
    model, ckpt = trained
    back = BiEncoder.from_pretrained(str(ckpt))
    assert back.config == {**model.config, "fast_cpu_dropout": True}  # from_pretrained's default
    for kind in ("query", "document"):
        torch.testing.assert_close(back.encode(TEXTS, kind), model.encode(TEXTS, kind), rtol=0, atol=0)
    assert (tiny_bi_encoder(seed=0).encode(TEXTS) - model.encode(TEXTS)).abs().max() > 1e-3


def test_composed_hydra_model_config_with_pooling_object_loads(tmp_path):
    """Checkpoints that store the composed model config (pooling as a nested ``_target_`` dict) still load."""
    model = _trained_like(pooling="cls")
    cfg = {"_target_": "embedlab.models.tiny_bi_encoder", "seed": 0, "pooling": {"_target_": "embedlab.models.Pooling", "mode": "cls"}}
    back = load_checkpoint(_write_checkpoint(tmp_path / "old.ckpt", model, model_cfg=cfg))
    assert back.pooling.mode == "cls"
    torch.testing.assert_close(back.encode(TEXTS), model.encode(TEXTS), rtol=0, atol=0)


def test_overrides_apply_to_the_rebuilt_model(trained):
    """Lengths (explicit max_seq_length beats the checkpoint's per-side lengths), prompts, normalize and
    similarity apply; the embeddings equal the trained model's with the same settings."""
    model, ckpt = trained
    back = BiEncoder.from_pretrained(
        str(ckpt), max_seq_length=8, document_max_seq_length=10, query_prompt="", normalize=False, similarity="dot",
        pooling="auto", projection_dim=None,
    )
    assert back.max_seq_length == {"query": 8, "document": 10}
    assert back.prompts == {"query": "", "document": ""}
    assert back.normalize is None and back.similarity == "dot"
    reference = copy.deepcopy(model)
    reference.max_seq_length, reference.prompts["query"], reference.normalize = {"query": 8, "document": 10}, "", None
    for kind in ("query", "document"):
        torch.testing.assert_close(back.encode(TEXTS, kind), reference.encode(TEXTS, kind), rtol=0, atol=0)
    # nothing set: the checkpoint's own settings
    assert BiEncoder.from_pretrained(str(ckpt)).max_seq_length == {"query": 12, "document": 24}


def test_architecture_overrides_are_refused_by_name(trained):
    model, ckpt = trained
    BiEncoder.from_pretrained(str(ckpt), pooling=Pooling("mean"), projection_dim=None)  # the trained ones: fine
    with pytest.raises(
        ModelLoadError,
        match=re.escape(
            f"checkpoint {str(ckpt)!r}: model.pooling, model.projection_dim cannot be applied: they change the "
            "architecture its weights were trained in (pooling='mean', projection_dim=None); remove them"
        ),
    ):
        BiEncoder.from_pretrained(str(ckpt), pooling="cls", projection_dim=16)
    with pytest.raises(
        ModelLoadError,
        match=re.escape(
            "model.attn_implementation cannot be applied: embedlab.models.tiny_bi_encoder, which rebuilds this "
            "checkpoint's model, does not take it; remove it"
        ),
    ):
        BiEncoder.from_pretrained(str(ckpt), attn_implementation="eager")


def test_torch_dtype_applies_to_a_checkpoint(trained):
    model, ckpt = trained
    back = BiEncoder.from_pretrained(str(ckpt), torch_dtype="bfloat16")
    assert {p.dtype for p in back.transformer.backbone.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(back.encode(TEXTS), model.encode(TEXTS), rtol=0, atol=3e-2)


def test_safe_load_reads_plain_checkpoint_contents(tmp_path):
    """Tensors, nested containers, numbers, strings and None come back as saved."""
    content = {"state_dict": {"w": torch.arange(6.0).view(2, 3)}, "loops": {"a": [1, 2.5, None, "x", (3, 4)]}}
    torch.save(content, tmp_path / "ok.ckpt")
    back = safe_load(tmp_path / "ok.ckpt")
    assert torch.equal(back["state_dict"]["w"], content["state_dict"]["w"]) and back["loops"] == content["loops"]
    assert os.listdir(tmp_path) == ["ok.ckpt"]
