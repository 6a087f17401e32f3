"""Layer-reduced students: a copy of a teacher bi-encoder that keeps only some of its transformer layers.

Initialising a student from the teacher's own layers (rather than from random weights or another model) starts
it close to the teacher, so embedding distillation has less to learn: sentence-transformers' "model
distillation" example keeps every other layer of the teacher; DistilBERT (Sanh et al. 2019) initialises from
every second layer of BERT. The embeddings, pooling, normalization, lengths, prompts and tokenizer are the
teacher's; the saved student is a normal sentence-transformers folder whose config says
``num_hidden_layers = len(layers)``.
"""

from __future__ import annotations

import inspect
from typing import Sequence

from torch import nn

from embedlab.models.bi_encoder import BiEncoder
from embedlab.models.errors import ModelLoadError

#: the ``_target_`` under which :func:`layer_reduced` records itself (checkpoints rebuild the student with it)
STUDENT_TARGET = "embedlab.models.student.layer_reduced"

#: where Hugging Face encoders keep their layer list (BERT/RoBERTa/MiniLM, DistilBERT, others), first match wins
_LAYER_PATHS = ("encoder.layer", "transformer.layer", "encoder.layers", "layers", "layer", "h")
#: the config attribute holding the layer count, by the same architectures
_COUNT_ATTRS = ("num_hidden_layers", "n_layers", "num_layers")


def layer_list(backbone: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """``(parent, attribute, layers)``: the ``nn.ModuleList`` of a Hugging Face encoder's transformer layers."""
    for path in _LAYER_PATHS:
        *parents, attr = path.split(".")
        parent = backbone
        for name in parents:
            parent = getattr(parent, name, None)
            if parent is None:
                break
        layers = getattr(parent, attr, None) if parent is not None else None
        if isinstance(layers, nn.ModuleList):
            return parent, attr, layers
    raise ModelLoadError(
        f"{type(backbone).__name__}: no transformer layer list found (looked for {', '.join(_LAYER_PATHS)})"
    )


def keep_layers(backbone: nn.Module, layers: Sequence[int]) -> None:
    """Keep only ``layers`` (0-based, in the given order) of ``backbone``'s transformer layers, in place, and set
    its config's layer count so a saved folder reloads with the same depth."""
    parent, attr, current = layer_list(backbone)
    layers = [int(i) for i in layers]
    bad = [i for i in layers if not 0 <= i < len(current)]
    if not layers or bad:
        raise ModelLoadError(
            f"layers must be a non-empty list of layer numbers in [0, {len(current) - 1}] "
            f"(the teacher has {len(current)} layers), got {layers}"
        )
    if len(set(layers)) != len(layers):
        raise ModelLoadError(f"layers lists a layer twice: {layers}")
    setattr(parent, attr, nn.ModuleList([current[i] for i in layers]))
    config = backbone.config
    for name in _COUNT_ATTRS:
        if hasattr(config, name):
            setattr(config, name, len(layers))
    # per-layer attributes some encoders read (e.g. BERT's layer_idx for caches): renumber in the new order
    for new_index, layer in enumerate(getattr(parent, attr)):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index


def layer_reduced(path: str, layers: Sequence[int], **options) -> BiEncoder:
    """The bi-encoder of ``path`` (any :meth:`BiEncoder.from_pretrained` source and ``options``) with only the
    transformer layers ``layers`` kept, e.g. ``layers=[0, 2, 4]`` for a 3-layer student of all-MiniLM-L6-v2.

    The kept layers are the teacher's own modules (same weights); the student's :attr:`BiEncoder.config`
    records ``path`` and ``layers``, so an embedlab checkpoint of it rebuilds the same architecture.
    """
    model = BiEncoder.from_pretrained(path, **options)
    keep_layers(model.transformer.backbone, layers)
    model.build_args = {**model.build_args, "_target_": STUDENT_TARGET, "layers": [int(i) for i in layers]}
    return model


def _signature_with_from_pretrained() -> inspect.Signature:
    """``layer_reduced(path, layers, <every BiEncoder.from_pretrained option>)``: the options by name, so checkpoint
    loading can check a stored config's arguments against them (:func:`embedlab.models.checkpoint.load_checkpoint`)."""
    own = list(inspect.signature(layer_reduced).parameters.values())[:2]  # path, layers
    options = list(inspect.signature(BiEncoder.from_pretrained).parameters.values())[1:]  # after path
    options = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in options]
    return inspect.Signature(own + options, return_annotation=BiEncoder)


layer_reduced.__signature__ = _signature_with_from_pretrained()
