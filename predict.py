"""Detect objects: `python predict.py ckpt_path=RUN/checkpoints/best.ckpt input=IMAGE_OR_FOLDER`."""

import hydra
from omegaconf import DictConfig

from detr_lightning.config import register_configs
from detr_lightning.predict import predict
from detr_lightning.training import exit_on_user_error

register_configs()  # the schemas conf/ composes with: every value is type-checked


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        predict(cfg)


if __name__ == "__main__":
    main()
