"""Interrupted runs lose nothing: SIGKILL mid-epoch or mid-save, SIGTERM, SLURM requeue, exact resume.

The runs through ``train.py`` take seconds each, most of it imports. The ones that need no other run's
files (the uninterrupted reference, the SIGTERM job and its requeue) go in one background lane started
with the module, beside the chain of interrupted attempts of the SIGKILL test: each lane keeps one of two
CPU cores busy (one thread per process, ``cli_env``).
"""

from __future__ import annotations

import csv
import signal
import subprocess
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import lightning
import pytest
import torch

from detr_lightning.callbacks.epoch_seed import EpochSeed
from detr_lightning.fault_tolerance import (
    SIGTERM_EXIT_CODE,
    AtomicCheckpointIO,
    RobustModelCheckpoint,
    resolve_resume_checkpoint,
)
from detr_lightning.models.weight_files import CheckpointError
from test_lit_module import loader, make_module, synthetic_batches

from .conftest import RunningTrain, cli_env, demo_args, load_checkpoint, run_cli

pytestmark = pytest.mark.slow

#: Deterministic algorithms and a data worker that lives across epochs (the harder case for resuming).
EXACT = ["trainer.deterministic=true", "data.num_workers=1", "data.persistent_workers=true"]


def _uninterrupted_run(data: Path, cwd: Path, env: dict[str, str]) -> Path:
    """The reference: the same 2-epoch run as the SIGKILL test's, never interrupted; its run folder."""
    run_dir = cwd / "run"
    result = run_cli(demo_args(data, run_dir, *EXACT), cwd=cwd, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@dataclass
class SigtermThenRequeue:
    """A 1-epoch run in a SLURM job stopped by SIGTERM in its second step, then the requeued job."""

    run_dir: Path
    stopped: RunningTrain  # the first job, finished
    returncode: int
    saved: dict  # last.ckpt when the first job had exited (empty if there was none)
    requeued: subprocess.CompletedProcess
    final: dict  # last.ckpt when the requeued job had exited (empty if there was none)


def _sigterm_then_requeue(data: Path, cwd: Path, env: dict[str, str]) -> SigtermThenRequeue:
    run_dir = cwd / "job"  # a SLURM script gives the requeued job the same hydra.run.dir
    last_ckpt = run_dir / "checkpoints" / "last.ckpt"
    args = demo_args(data, run_dir, "trainer.max_epochs=1")
    run = RunningTrain(args, cwd=cwd, fault="stall_step:0:1", env={**env, "SLURM_JOB_ID": "4242"})
    run.wait_for_fault()
    run.process.send_signal(signal.SIGTERM)  # what a scheduler sends before it kills the job
    returncode = run.finish()
    saved = load_checkpoint(last_ckpt) if last_ckpt.is_file() else {}
    requeued = run_cli(args, cwd=cwd, env={**env, "SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "1"})
    final = load_checkpoint(last_ckpt) if last_ckpt.is_file() else {}
    return SigtermThenRequeue(run_dir, run, returncode, saved, requeued, final)


@dataclass
class BackgroundRuns:
    uninterrupted: Future[Path]
    sigterm_then_requeue: Future[SigtermThenRequeue]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """The in-process tests below run beside the background lane: one thread, as its processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def background_runs(small_demo, tmp_path_factory) -> Iterator[BackgroundRuns]:
    """The runs no other run waits for, one after the other in a background lane (results as futures).

    Their environment is read now: the tests that run meanwhile change this process's (``monkeypatch``)."""
    env = cli_env()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="background-runs") as lane:
        yield BackgroundRuns(
            lane.submit(_uninterrupted_run, small_demo, tmp_path_factory.mktemp("uninterrupted"), env),
            lane.submit(_sigterm_then_requeue, small_demo, tmp_path_factory.mktemp("sigterm"), env),
        )


def _last_row(run_dir: Path) -> dict[str, str]:
    return list(csv.DictReader((run_dir / "metrics.csv").open()))[-1]


def assert_same_run(resumed: Path, reference: Path) -> None:
    """Same weights, optimizer moments and logged figures (1e-6) at the end of both runs."""
    ours, theirs = (load_checkpoint(run / "checkpoints" / "last.ckpt") for run in (resumed, reference))
    assert (ours["epoch"], ours["global_step"]) == (theirs["epoch"], theirs["global_step"]) == (1, 6)
    torch.testing.assert_close(ours["state_dict"], theirs["state_dict"], atol=1e-6, rtol=0)
    torch.testing.assert_close(
        ours["optimizer_states"][0]["state"], theirs["optimizer_states"][0]["state"], atol=1e-6, rtol=0
    )
    assert ours["lr_schedulers"] == theirs["lr_schedulers"]
    rows = _last_row(resumed), _last_row(reference)
    for key in ("train/loss", "train/loss_giou", "val/loss", "val/map", "val/map_50"):
        assert rows[0][key] != "" and float(rows[0][key]) == pytest.approx(float(rows[1][key]), abs=1e-6), key


def test_sigkill_mid_epoch_and_mid_save_then_resume_ends_as_an_uninterrupted_run(
    small_demo, background_runs, tmp_path
):
    run_dir = tmp_path / "outputs" / "demo" / "run"  # every attempt in the same folder (as SLURM reruns)
    last_ckpt = run_dir / "checkpoints" / "last.ckpt"

    # 1. SIGKILL in the middle of epoch 1: last.ckpt is the complete one of the end of epoch 0.
    run = RunningTrain(demo_args(small_demo, run_dir, *EXACT), cwd=tmp_path, fault="stall_step:1:1")
    run.wait_for_fault()
    run.process.kill()
    assert run.finish() == -signal.SIGKILL
    assert (load_checkpoint(last_ckpt)["epoch"], load_checkpoint(last_ckpt)["global_step"]) == (0, 3)

    # 2. Resume, and SIGKILL while the new last.ckpt (end of epoch 1) is half written.
    resume = demo_args(small_demo, run_dir, *EXACT, "ckpt_path=last")
    run = RunningTrain(resume, cwd=tmp_path, fault="stall_save:1")
    run.wait_for_fault()
    run.process.kill()
    assert run.finish() == -signal.SIGKILL
    assert f"Resuming from {last_ckpt}" in run.output()
    partial = list(last_ckpt.parent.glob(".last.ckpt.*.tmp"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0
    with pytest.raises(Exception):  # noqa: B017 - the half-written file is garbage, and only the temp is
        torch.load(partial[0], weights_only=True)
    assert (load_checkpoint(last_ckpt)["epoch"], load_checkpoint(last_ckpt)["global_step"]) == (0, 3)

    # 3. Resume again: the same weights and figures as the run that was never interrupted.
    result = run_cli(resume, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(run_dir, background_runs.uninterrupted.result(timeout=600))
    assert not list(last_ckpt.parent.glob(".*.tmp"))  # the killed writer's temporary file is gone


def test_resume_resolution(tmp_path, monkeypatch):
    runs = tmp_path / "outputs" / "demo"
    older, newer, current = runs / "a", runs / "b", runs / "c"
    for run in (older, newer):
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert resolve_resume_checkpoint("last", str(current)) == str(newer / "checkpoints" / "last.ckpt")
    assert resolve_resume_checkpoint(None, str(newer)) is None  # outside SLURM a new run starts over
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_resume_checkpoint(str(tmp_path / "nope.ckpt"), str(current))

    monkeypatch.setenv("SLURM_JOB_ID", "7")
    assert resolve_resume_checkpoint(None, str(current)) is None  # first start of the job
    assert resolve_resume_checkpoint(None, str(older)) == str(older / "checkpoints" / "last.ckpt")
    (older / "hpc_ckpt_1.ckpt").write_bytes(b"x")  # Lightning's save on SLURM's requeue signal, newer
    assert resolve_resume_checkpoint(None, str(older)) == str(older / "hpc_ckpt_1.ckpt")
    assert resolve_resume_checkpoint("last", str(older)) == str(newer / "checkpoints" / "last.ckpt")


def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    io_plugin = AtomicCheckpointIO()
    target = tmp_path / "checkpoints" / "last.ckpt"
    io_plugin.save_checkpoint({"epoch": 0}, target)
    (target.parent / ".last.ckpt.999999.tmp").write_bytes(b"left by a killed writer")

    def failing_write(checkpoint, file):
        file.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(AtomicCheckpointIO, "write", staticmethod(failing_write))
    with pytest.raises(OSError, match="No space left"):
        io_plugin.save_checkpoint({"epoch": 1}, target)
    assert load_checkpoint(target) == {"epoch": 0}
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]  # no temporary file left


class _ConstantMetric(lightning.Callback):
    """Logs a monitored value that never improves after the first epoch."""

    def on_validation_epoch_end(self, trainer, pl_module):
        pl_module.log("val/score", 1.0)


def test_last_ckpt_follows_every_epoch_even_without_improvement(tmp_path):
    checkpoint = RobustModelCheckpoint(
        dirpath=tmp_path, filename="best", monitor="val/score", mode="max", save_last=True
    )
    trainer = lightning.Trainer(
        accelerator="cpu",
        max_epochs=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[checkpoint, _ConstantMetric()],
        plugins=[AtomicCheckpointIO()],
        limit_train_batches=1,
        num_sanity_val_steps=0,
    )
    trainer.fit(make_module(), loader(synthetic_batches(1)), loader(synthetic_batches(1)))
    assert load_checkpoint(tmp_path / "best.ckpt")["epoch"] == 0  # never improved after epoch 0
    assert load_checkpoint(tmp_path / "last.ckpt")["epoch"] == 2  # stock ModelCheckpoint: still 0


def _fit_with_dropout(tmp_path, callbacks, ckpt_path=None) -> dict[str, torch.Tensor]:
    """A process of ``train.py`` in miniature: seed, build the tiny DETR (dropout 0.1), fit 2 epochs: from
    the start, keeping the checkpoint of every epoch (``epoch=0.ckpt``, ...) in ``tmp_path``, or resumed."""
    torch.manual_seed(0)
    module = make_module()
    assert module.model.transformer.encoder.layers[0].dropout.p > 0
    trainer = lightning.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            RobustModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=0 if ckpt_path else -1),
            *callbacks,
        ],
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, loader(synthetic_batches(2)), ckpt_path=ckpt_path, weights_only=True)
    return module.model.state_dict()


@pytest.mark.parametrize("epoch_seed", [True, False], ids=["callbacks=exact_resume", "default"])
def test_dropout_resumes_exactly_with_the_epoch_seed_callback_only(tmp_path, epoch_seed):
    callbacks = [EpochSeed(seed=0)] if epoch_seed else []
    uninterrupted = _fit_with_dropout(tmp_path, callbacks)
    assert load_checkpoint(tmp_path / "epoch=0.ckpt")["epoch"] == 0
    # Then, as the next process after a kill in epoch 1: resume from the end of epoch 0, in the same folder.
    resumed = _fit_with_dropout(tmp_path, callbacks, ckpt_path=tmp_path / "epoch=0.ckpt")
    same = all(torch.allclose(resumed[k], uninterrupted[k], atol=1e-6, rtol=0) for k in uninterrupted)
    assert same == epoch_seed  # by default epoch 1 draws other dropout masks: plain PyTorch stream


def test_sigterm_saves_last_and_a_requeued_slurm_job_resumes(background_runs):
    job = background_runs.sigterm_then_requeue.result(timeout=600)
    run_dir = job.run_dir
    assert job.returncode == SIGTERM_EXIT_CODE, job.stopped.output()[-3000:]
    output = job.stopped.output()
    assert "Traceback" not in output
    assert f"SIGTERM: saved {run_dir / 'checkpoints' / 'last.ckpt'}" in output
    saved = job.saved
    assert (saved["epoch"], saved["global_step"]) == (0, 2)  # the step in flight was finished, then saved

    requeued = job.requeued
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert "SLURM job 4242 restarted (restart count 1): resuming from" in requeued.stdout + requeued.stderr
    final = job.final
    assert (final["epoch"], final["global_step"]) == (0, 3)  # the epoch's last step, not a restart
