"""Evaluate DETR: `python eval.py ckpt_path=RUN/checkpoints/best.ckpt` or `model.pretrained=detr_r50`."""

import hydra
from omegaconf import DictConfig

from detr_lightning.config import register_configs
from detr_lightning.evaluation import evaluate
from detr_lightning.training import exit_on_user_error

register_configs()  # the schemas conf/ composes with: every value is type-checked


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> float | None:
    with exit_on_user_error():
        metrics = evaluate(cfg)
    return metrics.get(f"{cfg.split}/map")


if __name__ == "__main__":
    main()
