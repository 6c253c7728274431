"""Checks that run before anything is built, so a bad setting fails in seconds with one clear message.

- :func:`check_config_types`: config values of the wrong type (``data.batch_size=abc``), which would
  otherwise fail deep inside a library with a stack trace.
- :func:`check_output_dirs`: every output folder can be created and written, and the checkpoint folder
  has room for the checkpoints (not discovered after the first epoch).
- :class:`RunDirCheck`: the Hydra callback that does the same for ``hydra.run.dir`` before Hydra
  creates it (Hydra itself reports that failure with a stack trace).
- :func:`warn_more_boxes_than_queries`: images with more objects than the model has queries.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from detr_lightning.models.spatial_prior import SPATIAL_PRIORS

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config value the run cannot use: the message names the key, the value and the fix."""


class OutputDirError(OSError):
    """An output folder that cannot be written or has no room for the checkpoints."""


_INT = (int,)
_NUMBER = (int, float)
_BOOL = (bool,)
_OPTIONAL = (type(None),)

#: Keys checked by :func:`check_config_types` and the types they accept.
CONFIG_TYPES: dict[str, tuple[type, ...]] = {
    "seed": _INT + _OPTIONAL,
    "max_consecutive_nonfinite": _INT,
    "model.num_classes": _INT + _OPTIONAL,
    "model.num_queries": _INT,
    "model.num_groups": _INT,
    "model.hidden_dim": _INT,
    "model.nheads": _INT,
    "model.enc_layers": _INT,
    "model.dec_layers": _INT,
    "model.dim_feedforward": _INT,
    "model.dropout": _NUMBER,
    "model.pre_norm": _BOOL,
    "model.aux_loss": _BOOL,
    "model.spatial_prior_sigma": _NUMBER,
    "optimizer.lr": _NUMBER,
    "optimizer.lr_backbone": _NUMBER,
    "optimizer.weight_decay": _NUMBER,
    "scheduler.lr_drop": _INT,
    "scheduler.gamma": _NUMBER,
    "loss.ce_loss_coef": _NUMBER,
    "loss.bbox_loss_coef": _NUMBER,
    "loss.giou_loss_coef": _NUMBER,
    "loss.eos_coef": _NUMBER,
    "loss.focal_alpha": _NUMBER,
    "loss.focal_gamma": _NUMBER,
    "loss.varifocal_alpha": _NUMBER,
    "loss.prior_prob": _NUMBER + _OPTIONAL,
    "postprocess.top_k": _INT + _OPTIONAL,
    "matcher.cost_class": _NUMBER,
    "matcher.cost_bbox": _NUMBER,
    "matcher.cost_giou": _NUMBER,
    "data.batch_size": _INT,
    "data.val_batch_size": _INT + _OPTIONAL,
    "data.num_workers": _INT,
    "data.drop_last": _BOOL,
    "data.check_images": _BOOL,
    "data.val_scale": _INT,
    "trainer.max_epochs": _INT + _OPTIONAL,
    "trainer.gradient_clip_val": _NUMBER + _OPTIONAL,
    "trainer.log_every_n_steps": _INT,
    "trainer.check_val_every_n_epoch": _INT + _OPTIONAL,
}

#: Keys that must be positive when set.
POSITIVE = {
    "model.num_classes",
    "model.num_queries",
    "model.num_groups",
    "max_consecutive_nonfinite",
    "data.batch_size",
    "data.val_batch_size",
    "postprocess.top_k",
    "model.spatial_prior_sigma",
}

#: Keys that take one of a few words, and those words.
CHOICES: dict[str, tuple[Any, ...]] = {
    "loss.class_loss": ("ce", "focal", "varifocal"),
    "model.spatial_prior": SPATIAL_PRIORS,
    "matcher.class_cost": (None, "softmax", "focal"),
}

_MISSING = object()


def _describe(types: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", type(None): "null"}
    if float in types:
        types = tuple(t for t in types if t is not int)
    return " or ".join(names[t] for t in types)


def _accepts(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types)


def check_config_types(cfg: DictConfig) -> None:
    """Raise a :class:`ConfigError` for the first key of :data:`CONFIG_TYPES` holding a wrong type."""
    for key, types in CONFIG_TYPES.items():
        value = OmegaConf.select(cfg, key, default=_MISSING)
        if value is _MISSING:
            continue
        if not _accepts(value, types):
            raise ConfigError(
                f"config: {key}={value!r} is {type(value).__name__}, expected {_describe(types)}. "
                f"Fix: give {key} {_describe(types)} on the command line or in the experiment file."
            )
        if key in POSITIVE and value is not None and value <= 0:
            raise ConfigError(f"config: {key}={value!r} must be positive. Fix: give {key} a value above 0.")
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key, default=_MISSING)
        if value is not _MISSING and value not in choices:
            words = " | ".join("null" if c is None else str(c) for c in choices)
            raise ConfigError(
                f"config: {key}={value!r} is not one of {words}. Fix: give {key} one of {words}."
            )
    prior = OmegaConf.select(cfg, "loss.prior_prob", default=None)
    if isinstance(prior, int | float) and not isinstance(prior, bool) and not 0 < prior < 1:
        raise ConfigError(f"config: loss.prior_prob={prior!r} must be between 0 and 1 (or null).")


# ----------------------------------------------------------------------------------------- output folders


def checkpoint_bytes(module: torch.nn.Module) -> int:
    """About the size of one training checkpoint: all weights and buffers plus AdamW's two moments."""
    weights = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    moments = 2 * sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    return weights + moments


def output_dirs(cfg: DictConfig) -> list[Path]:
    """The folders a training run writes to: the run folder, callbacks' folders, loggers' save dirs."""
    found = [OmegaConf.select(cfg, "trainer.default_root_dir", default=None)]
    for group, keys in (("callbacks", ("dirpath", "output_dir")), ("logger", ("save_dir",))):
        for node in (cfg.get(group) or {}).values():
            if isinstance(node, DictConfig):
                found += [node.get(key) for key in keys]
    dirs: list[Path] = []
    for value in found:
        if value and "://" not in str(value) and Path(str(value)) not in dirs:
            dirs.append(Path(str(value)))
    return dirs


def _writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        raise OutputDirError(
            f"output folder {directory} cannot be written ({error.strerror or error}). Fix: choose a "
            "writable place with hydra.run.dir=DIR (or the callback's dirpath), or fix its permissions."
        ) from None


def check_output_dirs(dirs: Iterable[Path], checkpoint_dir: Path | None, checkpoint_size: int) -> None:
    """Every folder of ``dirs`` is writable; ``checkpoint_dir`` has room for best + last + a temporary copy.

    Raises:
        OutputDirError: naming the folder, the reason and the fix.
    """
    for directory in dirs:
        _writable(directory)
    if checkpoint_dir is None:
        return
    _writable(checkpoint_dir)
    needed = 3 * checkpoint_size + 64 * 2**20  # best.ckpt, last.ckpt, one being written; logs and plots
    free = shutil.disk_usage(checkpoint_dir).free
    if free < needed:
        raise OutputDirError(
            f"output folder {checkpoint_dir} has {free / 2**20:.0f} MiB free, but training needs about "
            f"{needed / 2**20:.0f} MiB (best.ckpt and last.ckpt of {checkpoint_size / 2**20:.0f} MiB each, "
            "a temporary copy while one is written, logs). Fix: free space there or point hydra.run.dir "
            "at a larger disk."
        )


def check_run_outputs(cfg: DictConfig, module: torch.nn.Module) -> None:
    """:func:`check_output_dirs` for a composed train config and its module."""
    checkpoint_dir = OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath", default=None)
    check_output_dirs(
        output_dirs(cfg), Path(str(checkpoint_dir)) if checkpoint_dir else None, checkpoint_bytes(module)
    )


class RunDirCheck(Callback):
    """Hydra callback: fail with one line (no stack trace) when ``hydra.run.dir``/``sweep.dir`` cannot be
    created or written, before Hydra tries to create it."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir)

    @staticmethod
    def _check(directory: str) -> None:
        try:
            _writable(Path(str(directory)))
        except OutputDirError as error:
            raise SystemExit(f"error: {error}") from None


# ------------------------------------------------------------------------------------------- objects


def warn_more_boxes_than_queries(datamodule: Any, num_queries: int) -> int:
    """Warn (once per split) about images with more objects than ``num_queries``; return the largest count.

    Each query predicts one box, so such an image can never have all its objects found: the extra
    targets stay unmatched in the loss and count as misses in mAP. Training still runs.
    """
    largest = 0
    for name in datamodule.layout.splits:
        split = datamodule.checked_split(name)
        counts = Counter(ann["image_id"] for ann in split.data["annotations"] if not ann["iscrowd"])
        over = {image_id: count for image_id, count in counts.items() if count > num_queries}
        if not over:
            continue
        image_id, count = max(over.items(), key=lambda item: item[1])
        largest = max(largest, count)
        log.warning(
            "data: %s: image id %d has %d boxes, more than model.num_queries=%d (%d image(s) of the %s split "
            "exceed it): one query predicts one box, so at most %d of them can be found. Fix: set "
            "model.num_queries=%d or more.",
            split.files.ann_file,
            image_id,
            count,
            num_queries,
            len(over),
            name,
            num_queries,
            count,
        )
    return largest
