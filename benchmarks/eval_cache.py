"""Embedding cache: a second ``evaluate.py`` of the same model and corpus reads every row instead of encoding.

1. Two runs of ``python evaluate.py model=MODEL data=DATA data.root=ROOT eval.cache_dir=CACHE logger=none
   progress_bar=false device=DEVICE hydra.run.dir=WORK/runN`` as subprocesses, one after the other, with a fresh
   cache: the first encodes and stores, the second reads. For each: the wall time of the whole process and
   ``test/eval_seconds`` from its ``metrics.json`` (encoding or reading + search + metrics). The metrics of the two
   runs, all but the ``*_seconds`` timings, must be identical (the same rows, not merely close ones).
2. The floor no cached run goes below: the wall time of a process that only imports ``embedlab.evaluating``.
3. Miss checks, in this process, on the first ``--miss-texts`` corpus documents, with the model ``evaluate.py``
   builds (the same composed config): the unchanged model finds them all in the cache (no encode call: the
   fingerprint is the same in another process); changing one weight, the document max length or the document
   prompt each encodes all of them again and returns the changed model's embeddings (compared with a live encode).

Writes a markdown report (machine, command, both times, their ratio, the checks).

    python benchmarks/eval_cache.py --data-root ../shared/data --out benchmarks/results/eval_cache.md

Tiny check (seconds; the tiny random model on generated data is not a measurement):

    python benchmarks/eval_cache.py --model tiny --data-root DIR_WITH_SCIFACT --miss-texts 8 --out /tmp/eval_cache.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TARGET_SPEEDUP = 20.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=os.environ.get("EMBEDLAB_DATA", "../shared/data"))
    parser.add_argument("--model", default="minilm_l6", help="a configs/model option (evaluate.py's model=...)")
    parser.add_argument("--data", default="scifact", help="a configs/data option with a test source")
    parser.add_argument("--device", default="auto", help="evaluate.py's device: auto (cuda if available), cpu, cuda")
    parser.add_argument("--work-dir", default=None, help="runs and cache (default: a new temporary folder)")
    parser.add_argument("--miss-texts", type=int, default=64, help="corpus documents of the miss checks")
    parser.add_argument("--out", default="benchmarks/results/eval_cache.md")
    args = parser.parse_args(argv)
    args.data_root = str(Path(args.data_root).resolve())
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def overrides(args: argparse.Namespace, cache: Path) -> list[str]:
    """evaluate.py's overrides, shared by the two runs and the miss checks' composed config."""
    return [
        f"model={args.model}", f"data={args.data}", f"data.root={args.data_root}", f"eval.cache_dir={cache}",
        "logger=none", "progress_bar=false", f"device={args.device}",
    ]


def timed(command: list[str]) -> float:
    """Run ``command`` from the project root; its wall time in seconds (raises when it fails)."""
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    return time.perf_counter() - start


def run_evaluate(args: argparse.Namespace, cache: Path, out: Path) -> tuple[float, dict[str, float]]:
    wall = timed([sys.executable, "evaluate.py", *overrides(args, cache), f"hydra.run.dir={out}"])
    return wall, json.loads((out / "metrics.json").read_text())


def scores(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if not k.endswith("_seconds")}


# ------------------------------------------------------------------------------------------------ miss checks
def compose_model_and_texts(args: argparse.Namespace, cache: Path, n: int):
    """The model evaluate.py builds from the same overrides, and the first ``n`` corpus documents of its test task."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    from embedlab.resolvers import register_resolvers

    register_resolvers()  # ${pkg_model:...} and the other embedlab resolvers of the configs
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=overrides(args, cache), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    task = instantiate(cfg.data.test).task()
    texts = [task.corpus[d] for d in list(task.corpus)[:n]]
    return (lambda: instantiate(cfg.model)), texts


def _one_weight(model) -> str:
    name, param = next((n, p) for n, p in model.named_parameters() if p.ndim == 2 and "encoder" in n)
    with torch.no_grad():
        param[0, 0] += 1e-2
    return f"{name}[0, 0] += 0.01"


def miss_checks(args: argparse.Namespace, cache_dir: Path) -> list[dict]:
    """Each row: the change, whether the cache was hit, encode calls and texts encoded, max |cache - live|."""
    from embedlab.cache import EmbeddingCache

    build, texts = compose_model_and_texts(args, cache_dir, args.miss_texts)

    def max_length(m):
        m.max_seq_length = {"query": m.max_seq_length["query"], "document": max(8, m.max_seq_length["document"] // 4)}
        return f"document max_seq_length {m.max_seq_length['document']}"

    def prompt(m):
        m.prompts["document"] = "passage: "
        return "document prompt 'passage: '"

    changes = [("none (the evaluated model)", lambda m: "-"), ("one weight", _one_weight), ("max length", max_length), ("prompt", prompt)]
    rows = []
    for label, change in changes:
        model = build().to(args.device)
        detail = change(model)
        live = model.encode(texts, kind="document")  # (n, D)
        calls: list[int] = []
        encode = model.encode
        model.encode = lambda t, *a, **k: calls.append(len(t)) or encode(t, *a, **k)
        got = EmbeddingCache(cache_dir).encode(model, texts, kind="document", device=args.device)
        rows.append({
            "change": label, "detail": detail, "hit": not calls, "encode_calls": len(calls), "texts_encoded": sum(calls),
            "max_abs_diff": float((got - live).abs().max()),
        })
    return rows


# ------------------------------------------------------------------------------------------------ report
def machine(device: str) -> str:
    gpu = f", {torch.cuda.get_device_name(0)}" if device.startswith("cuda") and torch.cuda.is_available() else ""
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, device {device}{gpu}"


def report(args, walls, metrics, import_floor, checks, identical, command) -> str:
    first, second = metrics
    eval_s = [m["test/eval_seconds"] for m in metrics]
    wall_ratio, eval_ratio = walls[0] / walls[1], eval_s[0] / eval_s[1]
    headline = next((k for k in ("test/ndcg@10", "test/spearman_cosine") if k in first), sorted(scores(first))[0])
    verdict = "meets" if wall_ratio >= TARGET_SPEEDUP else "misses"
    lines = [
        f"# Embedding cache: evaluate.py twice, {args.model} on {args.data}",
        "",
        f"- machine: {machine(args.device)}; load average at the end {' / '.join(f'{x:.1f}' for x in os.getloadavg())}",
        f"- command: `{command}`",
        f"- each run: `python evaluate.py {' '.join(shlex.quote(o) for o in overrides(args, Path('CACHE')))} hydra.run.dir=RUN`, "
        "a fresh process; the cache empty before the first",
        "",
        "| run | process wall (s) | test/eval_seconds | " + headline + " |",
        "|---|---|---|---|",
        f"| first (encodes, stores) | {walls[0]:.2f} | {eval_s[0]:.3f} | {first[headline]:.4f} |",
        f"| second (reads) | {walls[1]:.2f} | {eval_s[1]:.3f} | {second[headline]:.4f} |",
        "",
        f"**second run {wall_ratio:.1f}x faster (process wall time; {verdict} the {TARGET_SPEEDUP:.0f}x target); "
        f"{eval_ratio:.1f}x on test/eval_seconds**",
        "",
        f"- metrics identical: {'yes' if identical else 'NO'} ({len(scores(first))} metrics, all but the *_seconds timings)",
        f"- floor: a process that only imports embedlab.evaluating takes {import_floor:.2f} s "
        f"({import_floor / walls[1]:.0%} of the second run)",
        "",
        f"## Miss checks ({args.miss_texts} corpus documents, the model evaluate.py builds, through the same cache)",
        "",
        "| change | detail | cache hit | encode calls | texts encoded | max abs(cache - live encode) |",
        "|---|---|---|---|---|---|",
    ]
    for row in checks:
        lines.append(
            f"| {row['change']} | {row['detail']} | {'yes' if row['hit'] else 'no'} | {row['encode_calls']} | "
            f"{row['texts_encoded']} | {row['max_abs_diff']:.2e} |"
        )
    expected = checks[0]["hit"] and not any(r["hit"] for r in checks[1:])
    lines += ["", f"- expected (the unchanged model hits, every change misses): {'yes' if expected else 'NO'}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = "python benchmarks/eval_cache.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="eval_cache_"))
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    walls, metrics = [], []
    for name in ("run1", "run2"):
        shutil.rmtree(work / name, ignore_errors=True)
        wall, m = run_evaluate(args, cache, work / name)
        walls.append(wall)
        metrics.append(m)
        print(f"{name}: {wall:.2f} s, test/eval_seconds {m['test/eval_seconds']:.3f}", flush=True)
    identical = scores(metrics[0]) == scores(metrics[1])
    import_floor = timed([sys.executable, "-c", "import embedlab.evaluating"])
    checks = miss_checks(args, cache)
    text = report(args, walls, metrics, import_floor, checks, identical, command)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    if not identical or not checks[0]["hit"] or any(r["hit"] for r in checks[1:]):
        raise SystemExit("eval_cache: a check failed (see the report)")


if __name__ == "__main__":
    main()
