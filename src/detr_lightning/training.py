"""Train (and test) from a composed Hydra config: what ``train.py`` runs."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from omegaconf import DictConfig

from detr_lightning.config import ConfigError, check_values, group_values
from detr_lightning.data.errors import DataError
from detr_lightning.distributed import (
    StoppedByRankZero,
    close_process_group,
    init_launched_process_group,
    on_rank_zero_first,
    process_group_backend,
    started_by_lightning_launcher,
)
from detr_lightning.fault_tolerance import (
    SIGTERM_EXIT_CODE,
    check_resume_checkpoint,
    resolve_resume_checkpoint,
)
from detr_lightning.lit_module import DETRLitModule, NonFiniteTrainingError
from detr_lightning.loggers import WandbSettingError
from detr_lightning.models.weight_files import CheckpointError
from detr_lightning.preflight import (
    OutputDirError,
    check_run_outputs,
    warn_more_boxes_than_queries,
)
from detr_lightning.speed import apply_speed_config

log = logging.getLogger(__name__)

#: Errors a user causes (data, weights, config values, W&B settings) or a run that diverged for good:
#: reported as one message, no traceback.
#: A rank stopped because rank 0 failed (``StoppedByRankZero``) counts as one too: a sweep records the
#: job as failed and goes on with the next, in step with rank 0.
USER_ERRORS = (
    DataError,
    CheckpointError,
    ConfigError,
    OutputDirError,
    WandbSettingError,
    NonFiniteTrainingError,
    StoppedByRankZero,
)


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry with a ``_target_`` of a dict-like group (callbacks, loggers)."""
    if not group:
        return []
    return [
        instantiate(node) for node in group.values() if isinstance(node, DictConfig) and "_target_" in node
    ]


def build_module(cfg: DictConfig, num_classes: int) -> DETRLitModule:
    """The LightningModule of ``cfg`` with ``num_classes`` filled in."""
    try:
        return DETRLitModule(
            model={**group_values(cfg.model), "num_classes": num_classes},
            matcher=group_values(cfg.matcher),
            loss=group_values(cfg.loss),
            optimizer=group_values(cfg.optimizer),
            scheduler=group_values(cfg.scheduler),
            max_consecutive_nonfinite=cfg.max_consecutive_nonfinite,
            postprocess=group_values(cfg.postprocess),
        )
    except ValueError as error:  # the model's (and torch's) own checks of its settings
        raise ConfigError(f"config: model: {error}. Fix: change that model.* value.") from None


def build_trainer(cfg: DictConfig, **kwargs: Any) -> lightning.Trainer:
    """``cfg.trainer`` with ``kwargs`` (callbacks, logger); a setting Lightning refuses (``trainer=gpu``
    without a GPU, more devices than the machine has) is a :class:`ConfigError`."""
    try:
        return instantiate(cfg.trainer, **kwargs)
    except InstantiationException as error:
        if not isinstance(refused := error.__cause__, MisconfigurationException):
            raise
        raise ConfigError(
            f"config: trainer: {refused} Fix: change that trainer.* value (trainer=cpu, gpu or ddp)."
        ) from None


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the model of ``cfg`` on its data, then test the best checkpoint; return the final figures."""
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
    datamodule, num_classes = checked_data(cfg)
    module = build_module(cfg, num_classes)
    check_run_outputs(cfg, module)  # writable, with room for the checkpoints: not found after an epoch
    if cfg.model.pretrained and not ckpt_path:
        module.load_pretrained()
    apply_speed_config(module.model, cfg.speed)

    callbacks = instantiate_group(cfg.callbacks)
    loggers = instantiate_group(cfg.logger)
    trainer = build_trainer(cfg, callbacks=callbacks, logger=loggers or False)
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
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.test and datamodule.has_split("test") and not trainer.fast_dev_run:
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None, weights_only=True, verbose=False)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    close_process_group()  # DDP: every rank ends together (a sweep's next job opens a new group)
    return metrics


def checked_data(cfg: DictConfig) -> tuple[Any, int]:
    """The data module of ``cfg`` and the number of classes, after the data check; in one process only.

    Under ``torchrun``/``srun`` every rank runs this, so the process group is opened here: global rank 0
    runs the check while the others wait for its verdict. A bad dataset then stops every rank with rank
    0's one message (the others print one short line) instead of one traceback per rank. Processes that
    Lightning's DDP launcher starts come to life only after their launcher (rank 0 of the node) passed
    the check, so they skip it. The other ranks still read the annotation files and image headers in
    Lightning's ``setup``: their datasets need what the check learns (repaired boxes, images to read
    without their EXIF rotation).
    """
    if started_by_lightning_launcher():
        return _data_checked_by_rank_zero(cfg)
    device = init_launched_process_group(process_group_backend(cfg.trainer.accelerator, cfg.trainer.strategy))
    checked = on_rank_zero_first(lambda: _check_data(cfg), device=device)
    return checked if checked is not None else _data_checked_by_rank_zero(cfg)


def _check_data(cfg: DictConfig) -> tuple[Any, int]:
    """The whole data check (images included) before anything is built: every split that will be used."""
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    num_classes = cfg.model.num_classes
    if num_classes is None:
        num_classes = datamodule.num_classes
        log.info("model.num_classes=%d from the data (%s)", num_classes, datamodule.label_mapping)
    datamodule.check_num_classes(num_classes)
    datamodule.setup("fit")
    if cfg.test and not cfg.trainer.get("fast_dev_run") and datamodule.has_split("test"):
        # Now, not after training: a bad test image stops the run in seconds, and under DDP with rank 0's
        # one message (in trainer.test every rank would find it and report it).
        datamodule.setup("test")
    warn_more_boxes_than_queries(datamodule, cfg.model.num_queries)
    return datamodule, num_classes


def _data_checked_by_rank_zero(cfg: DictConfig) -> tuple[Any, int]:
    """The data module and number of classes of a rank whose data rank 0 checked (nothing is re-checked
    or re-logged here; the class count reads the annotation files, as Lightning's ``setup`` will)."""
    datamodule = instantiate(cfg.data)
    num_classes = cfg.model.num_classes
    return datamodule, num_classes if num_classes is not None else datamodule.num_classes


def user_error(error: BaseException) -> BaseException | None:
    """``error``, or what a constructor raised inside Hydra's ``instantiate``, if one of `USER_ERRORS`."""
    cause = error.__cause__ if isinstance(error, InstantiationException) else error
    return cause if isinstance(cause, USER_ERRORS) else None


@contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Turn a user-caused error into its message on stderr and exit status 1 (no traceback)."""
    try:
        yield
    except StoppedByRankZero as stop:  # rank 0 prints the error: one short line here
        raise SystemExit(str(stop)) from None
    except Exception as raised:
        if (error := user_error(raised)) is None:
            raise
        # To the job's log file only (conf/hydra/job_logging/detr.yaml): the console gets the `error:` line.
        logging.getLogger("detr_lightning.user_error").error("%s", error)
        raise SystemExit(f"error: {error}") from None
