"""Fixtures for the plots and reports: a two-job sweep of short real training runs, a fake trainer."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from lightning.pytorch.trainer.states import TrainerFn

from conftest import DemoSweep  # tests/ is on sys.path (rootdir-relative packages)


@pytest.fixture(scope="session")
def demo_data(small_demo) -> Path:
    """The demo dataset with 12/6/6 images."""
    return small_demo


@pytest.fixture(scope="session")
def sweep(demo_sweep) -> DemoSweep:
    """The suite's two-job sweep of short real training runs (tests/conftest.py)."""
    return demo_sweep


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
