"""Checks that run before anything is built, so a bad setting fails in seconds with one clear message:
output folders that cannot be written or have no room for the checkpoints (found now, not after the first
epoch), images with more objects than the model has queries."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class OutputDirError(OSError):
    """An output folder that cannot be written or has no room for the checkpoints."""


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
    dirs = [Path(str(value)) for value in found if value and "://" not in str(value)]
    return list(dict.fromkeys(dirs))  # without repeats, in order


def _writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=directory).close()
    except OSError as error:
        raise OutputDirError(
            f"output folder {directory} cannot be written ({error.strerror or error}). Fix: choose a "
            "writable place with hydra.run.dir=DIR (or the callback's dirpath), or fix its permissions."
        ) from None


def check_output_dirs(dirs: Iterable[Path], checkpoint_dir: Path | None, checkpoint_size: int) -> None:
    """Every folder of ``dirs`` is writable and ``checkpoint_dir`` has room for best + last + a temporary
    copy, or an `OutputDirError` names the folder, the reason and the fix."""
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
    """Hydra callback: fail with one line when ``hydra.run.dir``/``sweep.dir`` cannot be created or written,
    before Hydra tries to create it (and reports that failure with a stack trace)."""

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


class RayGpuCheck(Callback):
    """Hydra callback: fail with one line when Hydra's Ray launcher (``hydra/launcher=gpu_pool``) would give
    each job more GPUs than a local Ray has (none on a CPU machine), where Ray would wait for them forever.

    A local Ray has ``ray.init.num_gpus`` GPUs, or else those torch sees; a cluster (``ray.init.address``)
    is not checked."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        launcher = config.hydra.launcher
        if not str(launcher.get("_target_", "")).endswith("RayLauncher") or launcher.ray.init.get("address"):
            return
        per_job = launcher.ray.remote.get("num_gpus") or 0
        declared = launcher.ray.init.get("num_gpus")
        available = torch.cuda.device_count() if declared is None else declared
        if per_job > available:
            raise SystemExit(
                f"error: hydra.launcher.ray.remote.num_gpus={per_job} GPU(s) per job, but this machine's Ray "
                f"has {available}, so no job would ever start. Fix: hydra/launcher=local_pool on a machine "
                "without a GPU, or hydra.launcher.ray.init.address=ADDRESS of a Ray cluster with GPUs."
            )


def warn_more_boxes_than_queries(datamodule: Any, num_queries: int) -> None:
    """Warn (once per split) about images with more objects than ``num_queries``, which can never have all
    their objects found (the extra targets stay unmatched and count as misses)."""
    for name in datamodule.layout.splits:
        split = datamodule.checked_split(name)
        counts = Counter(ann["image_id"] for ann in split.data["annotations"] if not ann["iscrowd"])
        over = {image_id: count for image_id, count in counts.items() if count > num_queries}
        if not over:
            continue
        image_id, count = max(over.items(), key=lambda item: item[1])
        log.warning(
            f"data: {split.files.ann_file}: image id {image_id} has {count} boxes, more than "
            f"model.num_queries={num_queries} ({len(over)} image(s) of the {name} split exceed it): one "
            f"query predicts one box, so at most {num_queries} of them can be found. Fix: set "
            f"model.num_queries={count} or more."
        )
