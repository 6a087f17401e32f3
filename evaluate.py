"""Evaluate a bi-encoder on retrieval (BEIR) or STS data: `python evaluate.py [overrides]` (see README)."""

import hydra
from omegaconf import DictConfig

import embedlab  # noqa: F401  (registers the config resolvers)
from embedlab.evaluating import evaluate


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
