"""Train (and test) from a composed Hydra config: what ``train.py`` runs."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from detr_lightning.config import ConfigError, check_values, group_values
from detr_lightning.data.errors import DataError
from detr_lightning.distributed import close_process_group
from detr_lightning.fault_tolerance import (
    SIGTERM_EXIT_CODE,
    check_resume_checkpoint,
    resolve_resume_checkpoint,
)
from detr_lightning.lit_module import DETRLitModule, NonFiniteTrainingError
from detr_lightning.models.weight_files import CheckpointError
from detr_lightning.preflight import (
    OutputDirError,
    check_run_outputs,
    warn_more_boxes_than_queries,
)
from detr_lightning.speed import apply_speed_config

log = logging.getLogger(__name__)

#: Errors a user causes (data, weights, config values) or a run that diverged for good: reported as one
#: message, no traceback.
USER_ERRORS = (DataError, CheckpointError, ConfigError, OutputDirError, NonFiniteTrainingError)


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry with a ``_target_`` of a dict-like group (callbacks, loggers)."""
    if not group:
        return []
    return [
        instantiate(node) for node in group.values() if isinstance(node, DictConfig) and "_target_" in node
    ]


def build_module(cfg: DictConfig, num_classes: int) -> DETRLitModule:
    """The LightningModule of ``cfg`` with ``num_classes`` filled in."""
    return DETRLitModule(
        model={**group_values(cfg.model), "num_classes": num_classes},
        matcher=group_values(cfg.matcher),
        loss=group_values(cfg.loss),
        optimizer=group_values(cfg.optimizer),
        scheduler=group_values(cfg.scheduler),
        max_consecutive_nonfinite=cfg.max_consecutive_nonfinite,
        postprocess=group_values(cfg.postprocess),
    )


def quiet_third_party_logs() -> None:
    """faster-coco-eval logs its own copy of the COCO summary at INFO; ours is printed once."""
    logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the model of ``cfg`` on its data, then test the best checkpoint; return the final figures."""
    quiet_third_party_logs()
    check_values(cfg)
    data = cfg.data
    if data.root is None and not data.train.ann_file and not data.generate_demo:
        raise ConfigError(
            "no training data: pass data.root=DIR (a COCO-format folder: Roboflow export or COCO layout) "
            "for the official DETR-R50 fine-tuning recipe, or experiment=demo for the built-in demo."
        )
    ckpt_path = resolve_resume_checkpoint(cfg.ckpt_path, cfg.trainer.default_root_dir)
    if ckpt_path:
        check_resume_checkpoint(ckpt_path)  # weights_only=True + allow-list, before Lightning reads it
    if cfg.seed is not None:
        lightning.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    num_classes = cfg.model.num_classes
    if num_classes is None:
        num_classes = datamodule.num_classes
        log.info("model.num_classes=%d from the data (%s)", num_classes, datamodule.label_mapping)
    datamodule.check_num_classes(num_classes)
    datamodule.setup("fit")  # the whole data check (images included) before anything is built
    warn_more_boxes_than_queries(datamodule, cfg.model.num_queries)
    module = build_module(cfg, num_classes)
    check_run_outputs(cfg, module)  # writable, with room for the checkpoints: not found after an epoch
    if cfg.model.pretrained and not ckpt_path:
        module.load_pretrained()
    apply_speed_config(module.model, cfg.speed)

    callbacks = instantiate_group(cfg.callbacks)
    loggers = instantiate_group(cfg.logger)
    trainer: lightning.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    hyperparameters = group_values(cfg)
    for logger in trainer.loggers:
        logger.log_hyperparams(hyperparameters)

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException:
        log.warning(
            "Stopped by SIGTERM after saving checkpoints/last.ckpt (exit status %d)", SIGTERM_EXIT_CODE
        )
        raise SystemExit(SIGTERM_EXIT_CODE) from None
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if _is_scalar(v)}
    if cfg.test and datamodule.has_split("test") and not trainer.fast_dev_run:
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None, weights_only=True, verbose=False)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if _is_scalar(v)})
    close_process_group()  # DDP: every rank ends together (a sweep's next job opens a new group)
    return metrics


def _is_scalar(value: Any) -> bool:
    return getattr(value, "numel", lambda: 1)() == 1


@contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Turn a user-caused error into its message on stderr and exit status 1 (no traceback)."""
    try:
        yield
    except USER_ERRORS as error:
        log.error("%s", error)
        raise SystemExit(f"error: {error}") from None
