"""Mine hard negatives for a BEIR training split: `python mine.py [overrides]` (docs/hard_negatives.md)."""

from omegaconf import DictConfig

from embedlab.cli import hydra_main


@hydra_main(config_name="mine")
def main(cfg: DictConfig) -> None:
    # imported here so that `--help` and config errors answer before torch and Lightning load
    from embedlab.mining import mine

    mine(cfg)


if __name__ == "__main__":
    main()
