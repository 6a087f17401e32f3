"""Mine hard negatives for a BEIR training split: `python mine.py [overrides]` (see README "Hard-negative mining")."""

import hydra
from omegaconf import DictConfig

import embedlab  # noqa: F401  (registers the config resolvers)
from embedlab.mining import mine


@hydra.main(version_base="1.3", config_path="configs", config_name="mine")
def main(cfg: DictConfig) -> None:
    mine(cfg)


if __name__ == "__main__":
    main()
