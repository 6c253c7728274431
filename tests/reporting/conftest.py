"""Fixtures for the plots and reports: a two-job sweep of short real training runs, a fake trainer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from lightning.pytorch.trainer.states import TrainerFn

from detr_lightning.data.demo import ensure_demo_dataset
from training.conftest import QUICK, run_train_cli  # tests/ is on sys.path (rootdir-relative packages)


@dataclass
class Sweep:
    path: Path
    jobs: list[Path]


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """The demo dataset with 12/6/6 images."""
    return ensure_demo_dataset(tmp_path_factory.mktemp("data") / "demo", num_train=12, num_val=6, num_test=6)


@pytest.fixture(scope="session")
def sweep(demo_data, tmp_path_factory) -> Sweep:
    """``python train.py -m loss.bbox_loss_coef=2,5``: two 2-epoch runs on the small demo set."""
    work_dir = tmp_path_factory.mktemp("reporting")
    sweep_dir = work_dir / "sweep"
    overrides = [o for o in QUICK if not o.startswith("trainer.max_epochs=")]
    result = run_train_cli(
        [
            "-m",
            "experiment=demo",
            f"data.root={demo_data}",
            f"hydra.sweep.dir={sweep_dir}",
            "loss.bbox_loss_coef=2,5",
            "trainer.max_epochs=2",
            "callbacks.plots.score_threshold=0",  # an untrained model scores low: draw its boxes anyway
            *overrides,
        ],
        cwd=work_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(path for path in sweep_dir.iterdir() if path.is_dir() and path.name.isdigit())
    assert [job.name for job in jobs] == ["0", "1"]
    return Sweep(sweep_dir, jobs)


def fake_trainer(root: Path, **fields: Any) -> SimpleNamespace:
    """What `TrainingPlots` reads of a single-process Trainer during fit."""
    defaults: dict[str, Any] = {
        "default_root_dir": str(root),
        "sanity_checking": False,
        "is_global_zero": True,
        "world_size": 1,
        "current_epoch": 0,
        "global_step": 0,
        "optimizers": [],
        "callback_metrics": {},
        "callbacks": [],
        "loggers": [],
        "datamodule": None,
        "state": SimpleNamespace(fn=TrainerFn.FITTING),
    }
    return SimpleNamespace(**{**defaults, **fields})
