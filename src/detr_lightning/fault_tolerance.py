"""Interrupted runs lose nothing: complete checkpoints (:class:`AtomicCheckpointIO`), ``last.ckpt`` at every
save point and on SIGTERM (:class:`RobustModelCheckpoint`), resuming with ``ckpt_path=last`` or as a
requeued SLURM job (:func:`resolve_resume_checkpoint`).

Only public Lightning API is used: ``TorchCheckpointIO.save_checkpoint``, the public hooks of
``ModelCheckpoint`` and ``Trainer.save_checkpoint``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any
from weakref import proxy

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from detr_lightning.files import atomic_writer
from detr_lightning.models.weight_files import CheckpointError, load_weights_file

log = logging.getLogger(__name__)

#: Exit status of a run stopped by SIGTERM after saving (128 + 15, the shell's convention).
SIGTERM_EXIT_CODE = 143


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` through :func:`~detr_lightning.files.atomic_writer`: a temporary file beside the
    target, ``fsync``, then ``os.replace``, so a reader (or a resumed run) never sees a partial file.

    Lightning's own writer stages the file in ``$TMPDIR`` and *copies* it when that is another file
    system, so a kill can leave a truncated file. Temporary files of killed writers are removed at the
    next save of the same name. Remote paths (``s3://`` ...) use Lightning's writer.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_writer(path, "wb", durable=True, remove_stale=True) as file:  # rank 0 writes
            self.write(checkpoint, file)

    @staticmethod
    def write(checkpoint: dict[str, Any], file: Any) -> None:
        """Serialize ``checkpoint`` into the open temporary ``file`` (a seam for fault-injection tests)."""
        torch.save(checkpoint, file)


def weights_are_finite(module: torch.nn.Module) -> bool:
    """Whether every parameter and floating-point buffer is finite (one host sync)."""
    tensors = [t for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True


class RobustModelCheckpoint(ModelCheckpoint):
    """:class:`~lightning.pytorch.callbacks.ModelCheckpoint` that keeps ``last.ckpt`` current and sane.

    The best (top-k) checkpoints are Lightning's, unchanged. ``last.ckpt`` (``save_last=True``) is written
    here, with ``Trainer.save_checkpoint``, at every save point: the end of every training epoch (after the
    best checkpoint, so the state it holds is current), after every validation within an epoch, every
    ``every_n_train_steps`` steps, and on SIGTERM before the run stops. Stock Lightning 2.6 writes it only
    together with an improved best checkpoint, and resuming from it would silently repeat epochs.
    Nothing is saved (neither best nor last) while the weights hold NaN/inf; a warning says so.
    """

    def __init__(self, *, save_last: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # without save_last: Lightning's last.ckpt follows only improvements
        self.keeps_last = bool(save_last)
        self.step_interval = kwargs.get("every_n_train_steps") or 0
        self.saves_on_a_timer = kwargs.get("train_time_interval") is not None
        self._last_saved_step: int | None = None
        self._warned_step: int | None = None

    def _finite_or_warn(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        if weights_are_finite(pl_module):
            return True
        if trainer.is_global_zero and self._warned_step != trainer.global_step:  # once per step
            self._warned_step = trainer.global_step
            log.warning(
                f"Not saving checkpoints at step {trainer.global_step}: the model weights hold NaN/inf. "
                f"The last good checkpoint stays in {self.dirpath}."
            )
        return False

    @staticmethod
    def _fitting(trainer: Trainer) -> bool:
        return trainer.state.fn == TrainerFn.FITTING and not (trainer.fast_dev_run or trainer.sanity_checking)

    def _can_save(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        return self._fitting(trainer) and self._finite_or_warn(trainer, pl_module)

    def _save_last(self, trainer: Trainer) -> None:
        """Write ``last.ckpt`` of the current step (once per step; every rank calls it)."""
        if not self.keeps_last or self._last_saved_step == trainer.global_step:
            return
        self.last_model_path = os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
        trainer.save_checkpoint(self.last_model_path, self.save_weights_only)
        self._last_saved_step = trainer.global_step
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        step_save = bool(self.step_interval) and trainer.global_step % self.step_interval == 0
        if (step_save or self.saves_on_a_timer) and not self._finite_or_warn(trainer, pl_module):
            return
        super().on_train_batch_end(trainer, pl_module, *args)
        if step_save and self._fitting(trainer):
            self._save_last(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._can_save(trainer, pl_module):
            return
        super().on_validation_end(trainer, pl_module)
        if not trainer.is_last_batch:  # at an epoch's end, last.ckpt follows on_train_epoch_end's best
            self._save_last(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._can_save(trainer, pl_module):
            return
        super().on_train_epoch_end(trainer, pl_module)
        self._save_last(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        sigterm = isinstance(exception, SIGTERMException) and self.keeps_last
        if not sigterm or not self._can_save(trainer, pl_module):
            return
        self._save_last(trainer)
        if trainer.is_global_zero:
            log.info(
                f"SIGTERM: saved {self.last_model_path} at epoch {trainer.current_epoch}, step "
                f"{trainer.global_step}; resume with ckpt_path=last (or the same hydra.run.dir under SLURM)."
            )


# ---------------------------------------------------------------------------------------------- resuming


def run_checkpoints(run_dir: Path) -> list[Path]:
    """Resumable checkpoints a run directory holds: ``checkpoints/last.ckpt`` and Lightning's
    ``hpc_ckpt_*.ckpt`` (written on SLURM's requeue signal)."""
    return [
        p for p in [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")] if p.is_file()
    ]


def resolve_resume_checkpoint(ckpt_path: str | None, output_dir: str | None) -> str | None:
    """The checkpoint ``trainer.fit`` resumes from.

    - ``ckpt_path=last``: the newest ``checkpoints/last.ckpt`` among the runs beside this one
      (``outputs/<task_name>/*``, this run's own folder included).
    - ``ckpt_path=null`` in a SLURM job (``SLURM_JOB_ID`` set) whose run folder already holds a
      checkpoint: a requeued job given the same ``hydra.run.dir`` resumes from its newest checkpoint
      instead of starting over and overwriting it.
    - any other value: a path, used as given.
    """
    if ckpt_path is None:
        if output_dir is None or not os.environ.get("SLURM_JOB_ID"):
            return None
        found = max(run_checkpoints(Path(output_dir)), key=os.path.getmtime, default=None)
        if found is not None:
            restarts = os.environ.get("SLURM_RESTART_COUNT", "?")  # set once the job was requeued
            job = os.environ["SLURM_JOB_ID"]
            log.info(f"SLURM job {job} restarted (restart count {restarts}): resuming from {found}")
        return None if found is None else str(found)
    if ckpt_path != "last":
        if not Path(ckpt_path).expanduser().is_file():
            raise CheckpointError(
                f"ckpt_path={ckpt_path} does not exist. Fix: give a run's checkpoints/last.ckpt."
            )
        return ckpt_path
    if output_dir is None:
        raise CheckpointError("ckpt_path=last needs the run directory; give the checkpoint's path instead.")
    this_run = Path(output_dir).resolve()
    latest = max(this_run.parent.glob("*/checkpoints/last.ckpt"), key=os.path.getmtime, default=None)
    if latest is None:
        raise CheckpointError(
            f"ckpt_path=last: no earlier run with checkpoints/last.ckpt in {this_run.parent}. "
            "Fix: give the checkpoint's path."
        )
    log.info("Resuming from %s", latest)
    return str(latest)


def check_resume_checkpoint(path: str) -> None:
    """Refuse, with the reason (a :class:`CheckpointError`), a checkpoint to resume from that is no training
    state or would run code on unpickling: read first with ``torch.load(weights_only=True)`` and the
    project's allow-list, it fails here instead of with a stack trace from inside Lightning."""
    checkpoint = load_weights_file(path)
    keys = set(checkpoint) if isinstance(checkpoint, dict) else set()
    missing = [key for key in ("state_dict", "optimizer_states", "loops") if key not in keys]
    if missing:
        raise CheckpointError(
            f"ckpt_path={path} is not a Lightning training checkpoint (no {', '.join(missing)}), so training "
            "cannot resume from it. Fix: give a run's checkpoints/last.ckpt; to start from weights use "
            "model.pretrained=PATH."
        )
