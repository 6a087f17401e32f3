"""Train a bi-encoder: `python train.py [overrides]` (see README)."""

import hydra
from omegaconf import DictConfig

import embedlab  # noqa: F401  (registers the config resolvers)
from embedlab.training import train


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics, _ = train(cfg)
    # returned for Hydra sweepers (hparams_search): the metric they optimize
    return metrics.get(cfg.get("optimized_metric")) if cfg.get("optimized_metric") else None


if __name__ == "__main__":
    main()
