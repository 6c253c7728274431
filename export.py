"""Export DETR: `python export.py ckpt_path=RUN/checkpoints/best.ckpt format=onnx|torchscript`."""

import hydra
from omegaconf import DictConfig

from detr_lightning.config import register_configs
from detr_lightning.export import export
from detr_lightning.training import exit_on_user_error

register_configs()  # the schemas conf/ composes with: every value is type-checked


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        export(cfg)


if __name__ == "__main__":
    main()
