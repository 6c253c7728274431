"""Evaluate a project checkpoint or official DETR weights: what ``eval.py`` runs."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from detr_lightning.checkpoints import DETRFile, read_project_checkpoint
from detr_lightning.config import check_values
from detr_lightning.distributed import close_process_group
from detr_lightning.lit_module import DETRLitModule
from detr_lightning.models.weight_files import CheckpointError
from detr_lightning.runs import run_data_config
from detr_lightning.speed import apply_speed_config
from detr_lightning.training import build_module, build_trainer, instantiate_group

log = logging.getLogger(__name__)


def data_config_for_checkpoint(cfg: DictConfig, ckpt_path: Path, command_line: list[str]) -> DictConfig:
    """The data settings of the run that wrote ``ckpt_path`` (its ``.hydra/config.yaml``), with the
    ``data.*`` overrides of this command line applied on top; ``cfg.data`` when the run's config is gone."""
    run_dir = ckpt_path.resolve().parent.parent
    run_data = run_data_config(run_dir)
    if run_data is None:
        return cfg.data
    data = OmegaConf.create(run_data)
    data_overrides = [o.removeprefix("data.") for o in command_line if o.startswith("data.")]
    if data_overrides:
        data = OmegaConf.merge(data, OmegaConf.from_dotlist(data_overrides))
    log.info("Data settings of %s (with %s)", run_dir, data_overrides or "no overrides")
    return data


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Run the COCO evaluation of ``cfg.split`` and return the figures (also in ``metrics.json``)."""
    check_values(cfg)
    if not cfg.ckpt_path and not cfg.model.pretrained:
        raise CheckpointError(
            "Nothing to evaluate: give ckpt_path=RUN/checkpoints/best.ckpt or model.pretrained=detr_r50."
        )
    data_cfg = cfg.data
    if cfg.ckpt_path:
        ckpt_path = Path(cfg.ckpt_path).expanduser()
        file = read_project_checkpoint(ckpt_path)  # a wrong file is reported before the data is read
        command_line = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
        data_cfg = data_config_for_checkpoint(cfg, ckpt_path, command_line)
    with open_dict(data_cfg):
        data_cfg.generate_demo = False
    datamodule = instantiate(data_cfg)
    if not datamodule.has_split(cfg.split):
        raise CheckpointError(f"{data_cfg.root} has no {cfg.split} split to evaluate.")
    if cfg.ckpt_path:
        module = project_module(file)
    else:
        num_classes = cfg.model.num_classes or datamodule.num_classes
        module = build_module(cfg, num_classes)
        module.load_pretrained()
    datamodule.check_num_classes(module.model.num_classes)
    apply_speed_config(module.model, cfg.speed)
    trainer = build_trainer(cfg, callbacks=instantiate_group(cfg.callbacks), logger=False)
    run = trainer.validate if cfg.split == "val" else trainer.test
    results = run(module, datamodule=datamodule, verbose=False)
    close_process_group()
    return {k: float(v) for k, v in (results[0] if results else {}).items()}


def project_module(file: DETRFile) -> DETRLitModule:
    """The LightningModule of a checkpoint of this project (:func:`read_project_checkpoint`): its
    settings, then its weights."""
    settings = file.hyper_parameters
    # The file holds every weight: nothing is downloaded (neither DETR nor ImageNet weights).
    model = {**settings["model"], "pretrained": None, "pretrained_backbone": False}
    module = DETRLitModule(**{**settings, "model": model})
    module.load_pretrained(file)
    return module
