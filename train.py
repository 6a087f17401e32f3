"""Train a bi-encoder: `python train.py [overrides]` (docs/configuration.md); sweeps: `python train.py -m ...` (docs/sweeps.md)."""

from omegaconf import DictConfig

from embedlab.cli import hydra_main
from embedlab.sweeps import run_job


@hydra_main(config_name="train")
def main(cfg: DictConfig) -> float | None:
    # imported here so that `--help` and config errors answer before torch and Lightning load
    from embedlab.training import train

    # for Hydra sweepers: the optimized metric at its best validation value (the checkpoint train() selected);
    # in a re-launched multirun, a job whose folder holds its complete result is skipped
    return run_job(cfg, train)


if __name__ == "__main__":
    main()
