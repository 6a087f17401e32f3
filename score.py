"""Score mined hard negatives with teachers, once: `python score.py hard_negatives=FILE [overrides]`
(docs/hard_negatives.md#teacher-scores)."""

from omegaconf import DictConfig

from embedlab.cli import hydra_main


@hydra_main(config_name="score")
def main(cfg: DictConfig) -> None:
    # imported here so that `--help` and config errors answer before torch and Lightning load
    from embedlab.scoring import score

    score(cfg)


if __name__ == "__main__":
    main()
