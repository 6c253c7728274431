"""Train DETR: `python train.py experiment=demo`, `python train.py data.root=DIR`, sweeps with `-m`"""

import hydra
from omegaconf import DictConfig

from detr_lightning.training import exit_on_user_error, train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    with exit_on_user_error():
        metrics = train(cfg)
    return metrics.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
