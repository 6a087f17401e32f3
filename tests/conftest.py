"""Shared fixtures: config composition, a tiny BEIR + STS data root, the real shared folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import embedlab  # noqa: F401  (config resolvers)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "configs"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def compose_config(config_name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose ``configs/<config_name>.yaml`` as the entry point would, with run paths set to ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.root_dir = str(PROJECT_ROOT)
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
