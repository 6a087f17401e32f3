"""Shared fixtures: config composition, a tiny BEIR + STS data root, the real shared folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import embedlab  # noqa: F401  (config resolvers)
from embedlab.data.records import Example

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "configs"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def compose_config(config_name: str, overrides: list[str], output_dir: Path, keep_hydra: bool = False) -> DictConfig:
    """Compose ``configs/<config_name>.yaml`` as the entry point would, with run paths set to ``output_dir``.

    The ``hydra`` node (sweeper, launcher, run dirs) is dropped unless ``keep_hydra``: the objects under test
    never read it, and resolving it needs a running Hydra app.
    """
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.root_dir = str(PROJECT_ROOT)
        if not keep_hydra:
            del cfg["hydra"]
    return cfg


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The real data/models folder (``$EMBEDLAB_SHARED``; CI sets it to ../shared)."""
    path = os.environ.get("EMBEDLAB_SHARED")
    if not path:
        pytest.skip("EMBEDLAB_SHARED not set: real-data check needs the shared data folder (CI sets it)")
    if not (Path(path) / "data" / "scifact").is_dir():
        pytest.skip(f"EMBEDLAB_SHARED={path} has no data/scifact")
    return Path(path)


TOPICS = [
    ("protein", "Proteins fold into three dimensional structures that determine their function."),
    ("vaccine", "Vaccines train the immune system to recognise a pathogen before infection."),
    ("climate", "Rising carbon dioxide levels warm the climate and acidify the oceans."),
    ("neuron", "Neurons transmit signals through synapses using neurotransmitters."),
    ("galaxy", "Galaxies contain billions of stars bound together by gravity."),
    ("bacteria", "Bacteria can become resistant to antibiotics through mutation."),
    ("volcano", "Volcanoes erupt when magma rises through cracks in the crust."),
    ("enzyme", "Enzymes speed up chemical reactions by lowering activation energy."),
    ("gene", "Genes are sequences of DNA that encode proteins."),
    ("ocean", "Ocean currents distribute heat around the planet."),
    ("virus", "Viruses replicate only inside the cells of a host organism."),
    ("photosynthesis", "Plants convert light into chemical energy by photosynthesis."),
]


def write_tiny_data(root: Path) -> Path:
    """A BEIR folder (``root/scifact``: 24 docs, 9 train + 3 test queries) and an STSb folder."""
    beir = root / "scifact"
    (beir / "qrels").mkdir(parents=True)
    corpus, queries, train, test = [], [], [], []
    for i, (topic, text) in enumerate(TOPICS):
        corpus.append({"_id": f"d{i}", "title": topic.title(), "text": text})
        corpus.append({"_id": f"x{i}", "title": "", "text": f"An unrelated note number {i} about {topic} trivia."})
        queries.append({"_id": f"q{i}", "text": f"what do we know about {topic}?"})
        (test if i % 4 == 3 else train).append(f"q{i}\td{i}\t{1 + i % 2}")
    (beir / "corpus.jsonl").write_text("\n".join(json.dumps(r) for r in corpus) + "\n")
    (beir / "queries.jsonl").write_text("\n".join(json.dumps(r) for r in queries) + "\n")
    header = "query-id\tcorpus-id\tscore\n"
    (beir / "qrels" / "train.tsv").write_text(header + "\n".join(train) + "\n")
    (beir / "qrels" / "test.tsv").write_text(header + "\n".join(test) + "\n")

    sts = root / "stsbenchmark"
    sts.mkdir()
    for split, n in (("train", 24), ("dev", 12), ("test", 12)):
        rows = []
        for i in range(n):
            a, b = TOPICS[i % len(TOPICS)], TOPICS[(i * 5 + 1) % len(TOPICS)]
            score = 5.0 * ((i * 7) % 11) / 10
            s2 = a[1] if score > 2.5 else b[1]
            rows.append(f"main-news\tnews\t2012\t{i:04d}\t{score:.3f}\t{a[1]}\t{s2}")
        (sts / f"sts-{split}.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory) -> Path:
    return write_tiny_data(tmp_path_factory.mktemp("data"))


# Shared by the distributed and gradient-cache tests: examples with known duplicate structure, and the
# tolerance check their comparisons against a single-process reference use.
def make_examples(n: int, negatives: bool = False, duplicates: bool = False) -> list[Example]:
    """``n`` (query, positive[, negative]) examples over the conftest topics. ``duplicates``: documents and
    queries repeat across the two ranks' halves so masking has work to do (see ``_duplicates``)."""
    out = []
    for i in range(n):
        topic, text = TOPICS[i % len(TOPICS)]
        ex = Example(
            query=f"what do we know about {topic} number {i}?",
            positive=f"{text} Fact {i}.",
            query_id=f"q{i}",
            positive_id=f"d{i}",
            known_positive_ids=[f"d{i}"],
        )
        if negatives:
            ex.negatives = [f"An unrelated note {i} about {topic} trivia."]
            ex.negative_ids = [f"n{i}"]
        out.append(ex)
    if duplicates:
        _duplicates(out)
    return out


def _duplicates(ex: list[Example]) -> None:
    """Per global batch of 8 (ranks 0 | 1 hold 0-3 | 4-7):
    - the same document d1 is the positive of queries 1 (rank 0) and 5 (rank 1);
    - query q2 appears twice (examples 2 and 6) with two different positives, both its known positives;
    - example 3's hard negative is document d4, which is the positive of query 4 (rank 1) and a known
      positive of query 7 (rank 1) as well (so query 7 must not count d4 as a negative either).
    """
    for base in range(0, len(ex), 8):
        e = ex[base : base + 8]
        if len(e) < 8:
            return
        e[5].positive, e[5].positive_id, e[5].known_positive_ids = e[1].positive, e[1].positive_id, [e[1].positive_id]
        e[6].query, e[6].query_id = e[2].query, e[2].query_id
        e[2].known_positive_ids = e[6].known_positive_ids = [e[2].positive_id, e[6].positive_id]
        if e[3].negatives:
            e[3].negatives, e[3].negative_ids = [e[4].positive], [e[4].positive_id]
        e[7].known_positive_ids = [e[7].positive_id, e[4].positive_id]


def assert_rel(got: torch.Tensor, want: torch.Tensor, what: str, rel: float = 1e-5) -> float:
    """max |got - want| <= rel * max |want| (relative to the tensor's scale; a tensor whose entries are all
    below 1e-8 counts on the scale 1e-8: attention key biases get a mathematically zero gradient, which
    float rounding turns into ~1e-20 noise); returns the relative error."""
    got, want = got.detach().double(), want.detach().double()
    scale = max(float(want.abs().max()), 1e-8)
    err = float((got - want).abs().max()) / scale
    assert err <= rel, f"{what}: relative error {err:.2e} > {rel:.0e}"
    return err


# ---------------------------------------------------------------------- pytrec_eval reference (metrics tests)
K_VALUES = (1, 3, 5, 10, 100)


def trec_order(scores: dict[str, float]) -> list[str]:
    """Reference ranking written independently of the module: float32 score desc, then doc id desc."""
    return sorted(scores, key=lambda d: (float(np.float32(scores[d])), d), reverse=True)


def pytrec_per_query(run, qrels, k_values=K_VALUES) -> dict[str, dict[str, float]]:
    """pytrec_eval numbers renamed to embedlab's keys; mrr@k = recip_rank of the run cut to its top k."""
    cut = ",".join(map(str, k_values))
    evaluator = _pytrec().RelevanceEvaluator(
        qrels, {f"ndcg_cut.{cut}", f"map_cut.{cut}", f"recall.{cut}", f"P.{cut}"}
    )
    raw = evaluator.evaluate(run)
    rr = _pytrec().RelevanceEvaluator(qrels, {"recip_rank"})
    out = {}
    for qid, m in raw.items():
        row = {}
        for k in k_values:
            row[f"ndcg@{k}"] = m[f"ndcg_cut_{k}"]
            row[f"map@{k}"] = m[f"map_cut_{k}"]
            row[f"recall@{k}"] = m[f"recall_{k}"]
            row[f"precision@{k}"] = m[f"P_{k}"]
            truncated = {d: run[qid][d] for d in trec_order(run[qid])[:k]}
            # an empty run dict is still evaluated by pytrec_eval (all zeros); keep it so
            row[f"mrr@{k}"] = rr.evaluate({qid: truncated})[qid]["recip_rank"] if truncated else 0.0
        out[qid] = row
    return out



def _pytrec():
    return pytest.importorskip("pytrec_eval")


def join_process_group(rank: int, port: int, world: int) -> None:
    """The environment of one externally launched DDP rank (Lightning sees it and launches nothing), one thread."""
    import warnings

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
        NODE_RANK="0", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
    )
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")


def clipped_sgd_step(module: torch.nn.Module, clip: float, lr: float) -> tuple[dict, dict]:
    """The hand-made reference step of the DDP tests: ``(gradients, parameters after the step)`` by name, after
    clipping the gradients' total norm to ``clip`` and one SGD step of ``lr`` (copies, detached)."""
    params = dict(module.named_parameters())
    grads = {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}
    torch.nn.utils.clip_grad_norm_(list(params.values()), clip)
    with torch.no_grad():
        for p in params.values():
            if p.grad is not None:
                p -= lr * p.grad
    return grads, {n: p.detach().clone() for n, p in params.items()}
