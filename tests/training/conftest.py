"""Fixtures for the training entry point: a small demo dataset and composed configs."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig

from cli_runs import cli_env, run_script

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "conf"

#: Overrides that make any experiment a seconds-long CPU run on the small demo set.
QUICK = [
    "trainer.accelerator=cpu",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "data.num_workers=0",
    "data.persistent_workers=false",
    "data.batch_size=2",
    "callbacks.progress_bar=null",
]


@pytest.fixture
def compose_config():
    """``compose_config(overrides, name="train")`` -> the composed ``conf/<name>.yaml`` (with the hydra
    node). As in a run, ``${hydra:...}`` interpolations resolve: HydraConfig holds a copy (it makes the
    hydra node it holds read-only), until the test ends."""

    def compose_with(overrides: list[str], name: str = "train"):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name=name, overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(copy.deepcopy(cfg))
        return cfg

    yield compose_with
    GlobalHydra.instance().clear()
    HydraConfig.instance().cfg = None


def run_train_cli(
    args: list[str], cwd: Path, timeout: float = 240, script: str = "train.py"
) -> subprocess.CompletedProcess:
    """Run ``python train.py ARGS`` (or another entry point) as a user would, from ``cwd``, in the tests'
    environment (:func:`cli_runs.cli_env`), as a fork of the preloaded server of :mod:`cli_runs`."""
    return run_script(REPO_ROOT / script, args, cwd=cwd, env=cli_env(), timeout=timeout)
