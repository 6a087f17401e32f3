"""Train a bi-encoder: `python train.py [overrides]` (docs/configuration.md)."""

from omegaconf import DictConfig

from embedlab.cli import hydra_main


@hydra_main(config_name="train")
def main(cfg: DictConfig) -> float | None:
    # imported here so that `--help` and config errors answer before torch and Lightning load
    from embedlab.training import train

    metrics, _ = train(cfg)
    # for Hydra sweepers (hparams_search): the optimized metric, which train() reports at its best
    # validation value (the checkpoint it selected), not the last one
    return metrics.get(cfg.optimized_metric)


if __name__ == "__main__":
    main()
