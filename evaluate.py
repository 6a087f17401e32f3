"""Evaluate a bi-encoder on retrieval (BEIR) or STS data: `python evaluate.py [overrides]` (docs/evaluation.md)."""

from omegaconf import DictConfig

from embedlab.cli import hydra_main


@hydra_main(config_name="evaluate")
def main(cfg: DictConfig) -> None:
    # imported here so that `--help` and config errors answer before torch and Lightning load
    from embedlab.evaluating import evaluate

    evaluate(cfg)


if __name__ == "__main__":
    main()
