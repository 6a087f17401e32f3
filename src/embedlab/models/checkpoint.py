"""Reading embedlab Lightning checkpoints, and rebuilding their model, without running code they name.

A ``.ckpt`` is a pickle. ``torch.load(weights_only=False)`` rebuilds any object the pickle names, by
calling any importable function with arguments of the file's choosing (``os.system("...")`` included),
so opening a downloaded checkpoint would run its author's code. :func:`safe_load` uses PyTorch's
restricted unpickler (``weights_only=True``): tensors, numbers, strings and plain containers only, plus
the globals listed in :data:`ALLOWED_GLOBALS`. Everything embedlab reads from a checkpoint goes through it.

:func:`load_checkpoint` then rebuilds the model (a bi-encoder or a cross-encoder) from the model config the
checkpoint stores, calling only the embedlab constructors of :data:`MODEL_BUILDERS`, never a function the
file names.
"""

from __future__ import annotations

import inspect
import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from embedlab.models.bi_encoder import FROM_PRETRAINED_TARGET, KINDS, BiEncoder, Normalize, resolve_lengths
from embedlab.models.cross_encoder import CROSS_ENCODER_TARGET, CrossEncoder
from embedlab.models.errors import ModelLoadError
from embedlab.models.pooling import AUTO, Pooling, folder_pooling
from embedlab.models.student import STUDENT_TARGET, layer_reduced
from embedlab.models.tiny import TINY_CROSS_ENCODER_TARGET, TINY_TARGET, tiny_bi_encoder, tiny_cross_encoder

#: Python classes a checkpoint may contain beyond what ``weights_only=True`` accepts by default (tensors,
#: ``OrderedDict``, int/float/str/bool/None, lists, tuples, dicts, sets, torch dtypes and devices).
#: It is empty: the checkpoints ``train()`` writes (Lightning's loops, callbacks, optimizer and scheduler
#: states, and ``embedlab_model_cfg``, a plain dict) hold nothing else, as
#: ``torch.serialization.get_unsafe_globals_in_checkpoint`` reports for runs with the MNRL and GradCache
#: losses, the PCA projection callback and bf16 mixed precision. Add a class here only when a checkpoint of
#: this project needs it, with the reason; never a function (calling one is what makes a pickle unsafe).
ALLOWED_GLOBALS: tuple[type, ...] = ()

_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def safe_load(path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> dict:
    """The checkpoint dict at ``path``, unpickled with PyTorch's restricted unpickler.

    Raises:
        ModelLoadError: the file is missing, is not a dict, or names a Python object outside the allow-list
            (the message names it; nothing of it is executed).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {str(path)!r} does not exist")
    try:
        with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)):
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ModelLoadError(
            f"checkpoint {str(path)!r} refused: it stores Python objects ({_refused_globals(path, err)}) beyond the "
            "tensors, numbers, strings and containers an embedlab checkpoint holds; unpickling them could run "
            "arbitrary code, so nothing was loaded"
        ) from err
    if not isinstance(checkpoint, dict):
        raise ModelLoadError(f"checkpoint {str(path)!r} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return checkpoint


def _refused_globals(path: Path, err: Exception) -> str:
    """The names of every refused global in the file (read without unpickling), else the one ``err`` names."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except ValueError:  # not a zip checkpoint (legacy torch.save format): the error names the first one
        names = []
    allowed = {f"{t.__module__}.{t.__qualname__}" for t in ALLOWED_GLOBALS}
    names = [n for n in names if n not in allowed]
    if not names:
        found = _REFUSED_GLOBAL.search(str(err))
        names = [found.group(1) if found else "unknown"]
    return ", ".join(names)


# --------------------------------------------------------------------------- rebuilding the model
#: ``_target_`` -> the function it names: the only callables a checkpoint's model config may invoke.
#: A stored config is data from the file; calling whatever it names (``hydra.utils.instantiate``) would
#: run any importable function, so anything else is refused.
_BI_ENCODER_BUILDERS: dict[str, Callable[..., BiEncoder]] = {
    FROM_PRETRAINED_TARGET: BiEncoder.from_pretrained,
    "embedlab.models.bi_encoder.BiEncoder.from_pretrained": BiEncoder.from_pretrained,
    TINY_TARGET: tiny_bi_encoder,
    "embedlab.models.tiny.tiny_bi_encoder": tiny_bi_encoder,
    STUDENT_TARGET: layer_reduced,
}
_CROSS_ENCODER_BUILDERS: dict[str, Callable[..., CrossEncoder]] = {
    CROSS_ENCODER_TARGET: CrossEncoder.from_pretrained,
    "embedlab.models.cross_encoder.CrossEncoder.from_pretrained": CrossEncoder.from_pretrained,
    TINY_CROSS_ENCODER_TARGET: tiny_cross_encoder,
    "embedlab.models.tiny.tiny_cross_encoder": tiny_cross_encoder,
}
MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {**_BI_ENCODER_BUILDERS, **_CROSS_ENCODER_BUILDERS}
#: ``_target_`` -> the class its builder returns (checked before building, see ``load_checkpoint(model_class=)``)
MODEL_CLASSES: dict[str, type[nn.Module]] = {
    **dict.fromkeys(_BI_ENCODER_BUILDERS, BiEncoder),
    **dict.fromkeys(_CROSS_ENCODER_BUILDERS, CrossEncoder),
}
_FAMILY = {BiEncoder: "bi-encoder", CrossEncoder: "cross-encoder"}
#: ``_target_`` values allowed inside a model config (the ``pooling`` config group's objects)
PART_BUILDERS: dict[str, Callable[..., object]] = {
    "embedlab.models.Pooling": Pooling,
    "embedlab.models.pooling.Pooling": Pooling,
    "embedlab.models.pooling.folder_pooling": folder_pooling,
}
#: options given to the builder (how the backbone is loaded); the caller's value replaces the stored one
LOAD_OPTIONS = ("torch_dtype", "attn_implementation", "fast_cpu_dropout", "trust_remote_code")
#: options that define the trained architecture: they must agree with the checkpoint
ARCHITECTURE_OPTIONS = ("pooling", "projection_dim", "num_labels")
#: option values that mean "not set: keep the checkpoint's"
_UNSET = {"pooling": (None, AUTO), "normalize": (None, AUTO), "trust_remote_code": (False,)}


def load_checkpoint(
    path: str | os.PathLike, model_class: type[nn.Module] | None = None, **options
) -> BiEncoder | CrossEncoder:
    """Rebuild the model of an embedlab Lightning checkpoint: its stored model config + trained weights.

    The checkpoint stores the model's config under ``"embedlab_model_cfg"``: a plain dict
    ``{"_target_": <builder>, <arguments>}`` (:attr:`BiEncoder.config` / :attr:`CrossEncoder.config`, or a
    composed Hydra model config). Only the builders of :data:`MODEL_BUILDERS` are called (and
    :data:`PART_BUILDERS` for nested objects). ``model_class`` (:class:`BiEncoder` or
    :class:`CrossEncoder`, what ``from_pretrained`` passes): a checkpoint of the other family raises
    :class:`ModelLoadError` before anything is built.

    ``options`` are the ``from_pretrained`` keyword arguments of the checkpoint's model class; unset ones
    (``None``, ``"auto"``, ``trust_remote_code=False``) keep the checkpoint's values. Set ones, for a
    bi-encoder:

    - ``max_seq_length`` / ``query_max_seq_length`` / ``document_max_seq_length`` (same precedence as for a
      folder, the checkpoint's lengths playing the folder's), ``query_prompt`` / ``document_prompt``,
      ``normalize``, ``similarity``: set on the rebuilt model (none changes a weight);
    - ``torch_dtype``, ``attn_implementation``, ``fast_cpu_dropout``, ``trust_remote_code``: passed to the
      builder, which loads the backbone with them;
    - ``pooling``, ``projection_dim``: the architecture the weights were trained in; a value that differs
      from the checkpoint's raises :class:`ModelLoadError` naming the keys, as does a load option the
      builder does not take.

    For a cross-encoder: ``max_length`` and ``activation`` are set on the rebuilt model; ``torch_dtype``,
    ``attn_implementation``, ``fast_cpu_dropout``, ``trust_remote_code`` go to the builder; ``num_labels``
    must agree with the trained head; ``require_head`` and ``seed`` change nothing (a checkpoint's head is
    trained, its weights come from the file).

    A checkpoint whose model was built with ``trust_remote_code=true`` loads only when the caller sets it too.
    """
    checkpoint = safe_load(path)
    model_cfg = checkpoint.get("embedlab_model_cfg")
    if not isinstance(model_cfg, dict):
        raise ModelLoadError(f"checkpoint {str(path)!r} was not written by embedlab train.py (no embedlab_model_cfg)")
    builder = _model_builder(model_cfg.get("_target_"), path)
    built = MODEL_CLASSES[model_cfg["_target_"]]
    if model_class is not None and not issubclass(built, model_class):
        raise ModelLoadError(
            f"checkpoint {str(path)!r} holds a {_FAMILY[built]} ({model_cfg['_target_']}), not a "
            f"{_FAMILY.get(model_class, model_class.__name__)}: load it with {built.__name__}.from_pretrained"
        )
    kwargs = {k: _build_part(v, path) for k, v in model_cfg.items() if k != "_target_"}
    if kwargs.get("trust_remote_code") and not options.get("trust_remote_code"):
        raise ModelLoadError(
            f"checkpoint {str(path)!r} was built with trust_remote_code=true (its backbone runs code from the model "
            "repository); set model.trust_remote_code=true to load it if you trust that repository"
        )
    accepted = inspect.signature(builder).parameters
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ModelLoadError(
            f"checkpoint {str(path)!r}: its model config has arguments {', '.join(unknown)} that "
            f"{model_cfg['_target_']} does not take"
        )
    given = {k: v for k, v in options.items() if v not in _UNSET.get(k, (None,))}
    refused = [k for k in LOAD_OPTIONS if k in given and k not in accepted]
    if refused:
        raise ModelLoadError(
            f"checkpoint {str(path)!r}: {_keys(refused)} cannot be applied: {model_cfg['_target_']}, which rebuilds "
            f"this checkpoint's model, does not take {'it' if len(refused) == 1 else 'them'}; remove "
            f"{'it' if len(refused) == 1 else 'them'}"
        )
    kwargs.update({k: given[k] for k in LOAD_OPTIONS if k in given})
    model = builder(**kwargs)
    if isinstance(model, CrossEncoder):
        trained = {"num_labels": model.num_labels}
    else:
        trained = {"pooling": model.pooling.mode, "projection_dim": model.dense.out_features if model.dense else None}
    asked = {
        k: given[k].mode if isinstance(given[k], Pooling) else given[k]
        for k in ARCHITECTURE_OPTIONS
        if k in given and k in trained
    }
    refused = [k for k, v in asked.items() if v != trained[k]]
    if refused:
        raise ModelLoadError(
            f"checkpoint {str(path)!r}: {_keys(refused)} cannot be applied: "
            f"{'it changes' if len(refused) == 1 else 'they change'} the architecture its weights were trained in "
            f"({', '.join(f'{k}={trained[k]!r}' for k in refused)}); remove {'it' if len(refused) == 1 else 'them'}"
        )
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ModelLoadError(
            f"checkpoint {str(path)!r}: its weights do not fit the model its config rebuilds: {str(err).splitlines()[0]}"
        ) from err
    _apply_settings(model, given)
    return model


def _apply_settings(model: BiEncoder | CrossEncoder, given: dict) -> None:
    """Set the options that change no weight (lengths, prompts, normalize, similarity, activation) on a
    rebuilt model."""
    if isinstance(model, CrossEncoder):
        if "max_length" in given:
            model.max_length = given["max_length"]
        if "activation" in given:
            model.activation = given["activation"]
        return
    model.max_seq_length = resolve_lengths(
        given.get("max_seq_length"),
        given.get("query_max_seq_length"),
        given.get("document_max_seq_length"),
        {f"{kind}_max_seq_length": n for kind, n in model.max_seq_length.items()},
    )
    for kind in KINDS:
        if f"{kind}_prompt" in given:
            model.prompts[kind] = given[f"{kind}_prompt"]
    if "normalize" in given:
        model.normalize = Normalize() if given["normalize"] else None
    if "similarity" in given:
        model.similarity = given["similarity"]


def _keys(names: list[str]) -> str:
    return ", ".join(f"model.{k}" for k in names)


def _model_builder(target: object, path: str | os.PathLike) -> Callable[..., nn.Module]:
    if target not in MODEL_BUILDERS:
        raise ModelLoadError(
            f"checkpoint {str(path)!r}: its model config names _target_ {target!r}, which is not an embedlab model "
            f"constructor ({', '.join(MODEL_BUILDERS)}); refused, as calling what a file names could run any code"
        )
    return MODEL_BUILDERS[target]


def _build_part(value: object, path: str | os.PathLike) -> object:
    """A stored config value with its nested ``{"_target_": ...}`` dicts built (allow-listed targets only)."""
    if isinstance(value, list):
        return [_build_part(v, path) for v in value]
    if not isinstance(value, dict):
        return value
    parts = {k: _build_part(v, path) for k, v in value.items() if k != "_target_"}
    if "_target_" not in value:
        return parts
    target = value["_target_"]
    if target not in PART_BUILDERS:
        raise ModelLoadError(
            f"checkpoint {str(path)!r}: its model config names _target_ {target!r}, which is not an embedlab model "
            f"part ({', '.join(PART_BUILDERS)}); refused, as calling what a file names could run any code"
        )
    return PART_BUILDERS[target](**parts)
