"""The sentence-transformers folder format: what :meth:`BiEncoder.save` writes and ``from_pretrained`` reads.

Layout (the Transformer module at the root, so the folder is also a plain Hugging Face model folder)::

    config.json, model.safetensors, tokenizer files     backbone + tokenizer (transformers' save_pretrained)
    sentence_bert_config.json                           max_seq_length, do_lower_case[, query/document_length]
    1_Pooling/config.json                               pooling_mode_* flags
    2_Dense/ (optional)                                 config.json + model.safetensors
    <n>_Normalize/ (optional)                           L2 normalization
    modules.json                                        the module list above
    config_sentence_transformers.json                   prompts, similarity_fn_name
    embedlab_config.json                                embedlab's own settings (pooling, per-side lengths, prompts)

Lengths: sentence-transformers has one ``max_seq_length``; embedlab writes the document length there and,
when the query length differs, also ``query_length`` / ``document_length``, which sentence-transformers 6
applies in ``encode_query`` / ``encode_document``. ``encode`` without a task (and sentence-transformers
before 6, which ignores the two keys) truncates every text at the document length: a query no longer than
the query length embeds identically, a longer one keeps more tokens than in embedlab.
"""

from __future__ import annotations

import json
from pathlib import Path

from embedlab.models.errors import ModelLoadError
from embedlab.models.pooling import ST_POOLING_FLAGS

KINDS = ("query", "document")
#: embedlab similarity name -> sentence-transformers ``similarity_fn_name``
ST_SIMILARITY = {"cos": "cosine", "dot": "dot"}


def write_folder(model, folder: Path) -> None:
    """Write every file of ``model`` (a :class:`~embedlab.models.BiEncoder`) into the existing, empty ``folder``."""
    model.transformer.backbone.save_pretrained(folder, safe_serialization=True)
    model.transformer.tokenizer.save_pretrained(folder)
    lengths = model.max_seq_length
    st_config = {"max_seq_length": lengths["document"], "do_lower_case": model.transformer.do_lower_case}
    if lengths["query"] != lengths["document"]:
        st_config.update(query_length=lengths["query"], document_length=lengths["document"])
    _write_json(folder / "sentence_bert_config.json", st_config)
    pooling_cfg = {"word_embedding_dimension": model.transformer.hidden_size, "include_prompt": True}
    pooling_cfg.update({flag: mode == model.pooling.mode for mode, flag in ST_POOLING_FLAGS.items()})
    pooling_cfg["pooling_mode_mean_sqrt_len_tokens"] = False
    (folder / "1_Pooling").mkdir()
    _write_json(folder / "1_Pooling" / "config.json", pooling_cfg)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if model.dense is not None:
        model.dense.save(folder / "2_Dense")
        modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    if model.normalize is not None:
        idx = len(modules)
        (folder / f"{idx}_Normalize").mkdir()
        modules.append(
            {"idx": idx, "name": str(idx), "path": f"{idx}_Normalize", "type": "sentence_transformers.models.Normalize"}
        )
    _write_json(folder / "modules.json", modules)
    _write_json(
        folder / "config_sentence_transformers.json",
        {
            "prompts": {k: v for k, v in model.prompts.items() if v},
            "default_prompt_name": None,
            "similarity_fn_name": ST_SIMILARITY[model.similarity],
        },
    )
    _write_json(
        folder / "embedlab_config.json",
        {
            "pooling": model.pooling.mode,
            "normalize": model.normalize is not None,
            "query_max_seq_length": lengths["query"],
            "document_max_seq_length": lengths["document"],
            "query_prompt": model.prompts["query"],
            "document_prompt": model.prompts["document"],
        },
    )


def read_folder_config(folder: Path) -> dict:
    """What an embedlab or sentence-transformers folder records, under ``BiEncoder.from_pretrained``'s names.

    Keys present only when the folder says so: ``pooling``, ``normalize``, ``max_seq_length``,
    ``query_max_seq_length``, ``document_max_seq_length``, ``do_lower_case``, ``query_prompt``,
    ``document_prompt``, ``similarity_fn_name`` (sentence-transformers' name, see
    :func:`similarity_from_st_name`), ``dense_path``. ``embedlab_config.json`` wins
    over the sentence-transformers files.
    """
    cfg: dict = {}
    st_cfg = folder / "sentence_bert_config.json"
    if st_cfg.is_file():
        st = json.loads(st_cfg.read_text())
        cfg.update({k: st[k] for k in ("max_seq_length", "do_lower_case") if st.get(k) is not None})
        for kind in KINDS:  # sentence-transformers 6 per-task lengths
            if st.get(f"{kind}_length"):
                cfg[f"{kind}_max_seq_length"] = st[f"{kind}_length"]
    modules_file = folder / "modules.json"
    if modules_file.is_file():
        modules = json.loads(modules_file.read_text())
        cfg["normalize"] = any(m["type"].endswith("Normalize") for m in modules)
        dense = [m for m in modules if m["type"].endswith("Dense")]
        if len(dense) > 1:
            raise ModelLoadError(f"{modules_file}: more than one Dense module; embedlab supports one")
        if dense:
            cfg["dense_path"] = dense[0]["path"]
        for m in modules:
            if m["type"].endswith("Pooling"):
                pcfg = json.loads((folder / m["path"] / "config.json").read_text())
                for mode, flag in ST_POOLING_FLAGS.items():
                    if pcfg.get(flag):
                        cfg["pooling"] = mode
                        break
    st_main = folder / "config_sentence_transformers.json"
    if st_main.is_file():
        st = json.loads(st_main.read_text())
        prompts = st.get("prompts") or {}
        for kind in KINDS:
            if kind in prompts:
                cfg[f"{kind}_prompt"] = prompts[kind]
        if st.get("similarity_fn_name"):
            cfg["similarity_fn_name"] = st["similarity_fn_name"]
    embedlab_cfg = folder / "embedlab_config.json"
    if embedlab_cfg.is_file():
        cfg.update(json.loads(embedlab_cfg.read_text()))
    return cfg


def similarity_from_st_name(name: str, source: str) -> str:
    """sentence-transformers' ``similarity_fn_name`` -> ``cos`` / ``dot``; other functions are refused
    (``source``: the model path, for the message)."""
    by_st_name = {v: k for k, v in ST_SIMILARITY.items()}
    if name not in by_st_name:
        raise ModelLoadError(
            f"model {source!r}: similarity_fn_name {name!r} is not supported by embedlab (it supports "
            f"{', '.join(by_st_name)}); pass model.similarity=cos or model.similarity=dot to override it"
        )
    return by_st_name[name]


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
