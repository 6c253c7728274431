"""Interrupted runs lose nothing: complete checkpoints, ``last.ckpt`` at every save point, SIGTERM, SLURM.

- :class:`AtomicCheckpointIO` (``trainer.plugins``) writes every checkpoint to a temporary file in the
  same folder, syncs it to disk and renames it over the target: a run killed while saving leaves the
  previous ``last.ckpt`` whole. (Lightning's own writer stages the file in ``$TMPDIR`` and *copies* it
  when that is another file system, so a kill can leave a truncated file.)
- :class:`RobustModelCheckpoint` (``callbacks.model_checkpoint``): ``last.ckpt`` at every save point,
  not only when ``best.ckpt`` improved (Lightning 2.6 skips it otherwise); no checkpoint of weights
  holding NaN/inf; on SIGTERM (what schedulers send before killing a job) ``last.ckpt`` of the current
  step, then the run stops (``train.py`` exits with status 143).
- :func:`resolve_resume_checkpoint`: ``ckpt_path=last`` and the automatic resume of a restarted SLURM
  job; :func:`check_resume_checkpoint` refuses files that need pickled code before Lightning reads them.

Only public Lightning API is used: the ``TorchCheckpointIO.save_checkpoint`` method, the public hooks of
``ModelCheckpoint`` and ``Trainer.save_checkpoint``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any
from weakref import proxy

import lightning
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from detr_lightning.files import atomic_writer
from detr_lightning.models.weight_files import CheckpointError, load_weights_file

log = logging.getLogger(__name__)

#: Exit status of a run stopped by SIGTERM after saving (128 + 15, the shell's convention).
SIGTERM_EXIT_CODE = 143

#: Environment variables of a SLURM job (``SLURM_RESTART_COUNT`` is set once the job was requeued).
SLURM_JOB_ENV = "SLURM_JOB_ID"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` through :func:`~detr_lightning.files.atomic_writer`: a temporary file beside the
    target, ``fsync``, then ``os.replace``.

    A reader (or a resumed run) sees the old file or the new one, never a partial one. Temporary files
    of killed writers are removed at the next save of the same name. Remote paths (``s3://`` ...) use
    Lightning's writer.
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
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


class RobustModelCheckpoint(ModelCheckpoint):
    """:class:`~lightning.pytorch.callbacks.ModelCheckpoint` that keeps ``last.ckpt`` current and sane.

    The best (top-k) checkpoints are Lightning's, unchanged. ``last.ckpt`` (``save_last=True``) is written
    here, with ``Trainer.save_checkpoint``, at every save point:

    - the end of every training epoch (after the best checkpoint, so the state it holds is current),
      after every validation within an epoch, and every ``every_n_train_steps`` steps, also when the
      monitored metric did not improve: stock Lightning 2.6 writes it only together with a best
      checkpoint, and resuming from it would silently repeat epochs;
    - on SIGTERM, ``last.ckpt`` of the current step, before the run stops.

    Nothing is saved (neither best nor last) while the weights hold NaN/inf; a warning says so.
    """

    def __init__(self, *, save_last: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # without save_last: Lightning's last.ckpt follows only improvements
        self.keeps_last = bool(save_last)
        self.step_interval = kwargs.get("every_n_train_steps") or 0
        self.saves_on_a_timer = kwargs.get("train_time_interval") is not None
        self._last_saved_step: int | None = None
        self._warned_step: int | None = None

    def _finite_or_warn(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> bool:
        if weights_are_finite(pl_module):
            return True
        if trainer.is_global_zero and self._warned_step != trainer.global_step:  # once per step
            self._warned_step = trainer.global_step
            log.warning(
                "Not saving checkpoints at step %d: the model weights hold NaN/inf. The last good "
                "checkpoint stays in %s.",
                trainer.global_step,
                self.dirpath,
            )
        return False

    @staticmethod
    def _fitting(trainer: lightning.Trainer) -> bool:
        return trainer.state.fn == TrainerFn.FITTING and not (trainer.fast_dev_run or trainer.sanity_checking)

    def _save_last(self, trainer: lightning.Trainer) -> None:
        """Write ``last.ckpt`` of the current step (once per step; every rank calls it)."""
        if not self.keeps_last or self._last_saved_step == trainer.global_step:
            return
        self.last_model_path = os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
        trainer.save_checkpoint(self.last_model_path, self.save_weights_only)
        self._last_saved_step = trainer.global_step
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def on_train_batch_end(
        self,
        trainer: lightning.Trainer,
        pl_module: lightning.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step_save = bool(self.step_interval) and trainer.global_step % self.step_interval == 0
        if (step_save or self.saves_on_a_timer) and not self._finite_or_warn(trainer, pl_module):
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if step_save and self._fitting(trainer):
            self._save_last(trainer)

    def on_validation_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        if not self._fitting(trainer) or not self._finite_or_warn(trainer, pl_module):
            return
        super().on_validation_end(trainer, pl_module)
        if not trainer.is_last_batch:  # at an epoch's end, last.ckpt follows on_train_epoch_end's best
            self._save_last(trainer)

    def on_train_epoch_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        if not self._fitting(trainer) or not self._finite_or_warn(trainer, pl_module):
            return
        super().on_train_epoch_end(trainer, pl_module)
        self._save_last(trainer)

    def on_exception(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, exception: BaseException
    ) -> None:
        super().on_exception(trainer, pl_module, exception)
        if not isinstance(exception, SIGTERMException) or not self._fitting(trainer) or not self.keeps_last:
            return
        if not self._finite_or_warn(trainer, pl_module):
            return
        self._save_last(trainer)
        if trainer.is_global_zero:
            log.info(
                "SIGTERM: saved %s at epoch %d, step %d; resume with ckpt_path=last (or the same "
                "hydra.run.dir under SLURM).",
                self.last_model_path,
                trainer.current_epoch,
                trainer.global_step,
            )


# ---------------------------------------------------------------------------------------------- resuming


def _newest(paths: list[Path]) -> Path | None:
    return max(paths, key=lambda path: path.stat().st_mtime) if paths else None


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
        if output_dir is None or not os.environ.get(SLURM_JOB_ENV):
            return None
        found = _newest(run_checkpoints(Path(output_dir)))
        if found is not None:
            log.info(
                "SLURM job %s restarted (restart count %s): resuming from %s",
                os.environ[SLURM_JOB_ENV],
                os.environ.get("SLURM_RESTART_COUNT", "?"),
                found,
            )
            return str(found)
        return None
    if ckpt_path != "last":
        if not Path(ckpt_path).expanduser().is_file():
            raise CheckpointError(
                f"ckpt_path={ckpt_path} does not exist. Fix: give a run's checkpoints/last.ckpt."
            )
        return ckpt_path
    if output_dir is None:
        raise CheckpointError("ckpt_path=last needs the run directory; give the checkpoint's path instead.")
    this_run = Path(output_dir).resolve()
    latest = _newest(list(this_run.parent.glob("*/checkpoints/last.ckpt")))
    if latest is None:
        raise CheckpointError(
            f"ckpt_path=last: no earlier run with checkpoints/last.ckpt in {this_run.parent}. "
            "Fix: give the checkpoint's path."
        )
    log.info("Resuming from %s", latest)
    return str(latest)


def check_resume_checkpoint(path: str) -> None:
    """Read ``path`` as ``train.py`` will resume from it, refusing what is unsafe or not a training state.

    The file is loaded with ``torch.load(weights_only=True)`` and the project's allow-list first, so a
    file that would run code on unpickling is refused with the reason (a :class:`CheckpointError`)
    instead of a stack trace from inside Lightning.
    """
    checkpoint = load_weights_file(path)
    keys = set(checkpoint) if isinstance(checkpoint, dict) else set()
    missing = [key for key in ("state_dict", "optimizer_states", "loops") if key not in keys]
    if missing:
        raise CheckpointError(
            f"ckpt_path={path} is not a Lightning training checkpoint (no {', '.join(missing)}), so training "
            "cannot resume from it. Fix: give a run's checkpoints/last.ckpt; to start from weights use "
            "model.pretrained=PATH."
        )
