"""Train (and test) from a composed Hydra config: what ``train.py`` runs."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from detr_lightning.checkpoints import CheckpointError
from detr_lightning.data.errors import DataError
from detr_lightning.lit_module import DETRLitModule

log = logging.getLogger(__name__)

#: Errors a user causes (data, weights, config values): reported as one message, no traceback.
USER_ERRORS = (DataError, CheckpointError)


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry with a ``_target_`` of a dict-like group (callbacks, loggers)."""
    if not group:
        return []
    return [
        instantiate(node) for node in group.values() if isinstance(node, DictConfig) and "_target_" in node
    ]


def build_module(cfg: DictConfig, num_classes: int) -> DETRLitModule:
    """The LightningModule of ``cfg`` with ``num_classes`` filled in."""
    model_args = OmegaConf.to_container(cfg.model, resolve=True)
    model_args["num_classes"] = num_classes
    return DETRLitModule(
        model=model_args,
        matcher=OmegaConf.to_container(cfg.matcher, resolve=True),
        loss={k: v for k, v in OmegaConf.to_container(cfg.loss, resolve=True).items() if k != "aux_loss"},
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True),
    )


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the model of ``cfg`` on its data, then test the best checkpoint; return the final figures."""
    if cfg.get("seed") is not None:
        lightning.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    num_classes = cfg.model.num_classes
    if num_classes is None:
        num_classes = datamodule.num_classes
        log.info("model.num_classes=%d from the data (%s)", num_classes, datamodule.label_mapping)
    datamodule.check_num_classes(num_classes)
    module = build_module(cfg, num_classes)
    if cfg.model.get("pretrained") and not cfg.get("ckpt_path"):
        module.load_pretrained()

    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    trainer: lightning.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    hyperparameters = OmegaConf.to_container(cfg, resolve=True)
    for logger in trainer.loggers:
        logger.log_hyperparams(hyperparameters)

    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if _is_scalar(v)}
    if cfg.get("test") and datamodule.has_split("test") and not trainer.fast_dev_run:
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if _is_scalar(v)})
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
