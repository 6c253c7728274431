"""Fixtures of the robustness tests: the small demo set, fast CLI arguments, runs that can be killed."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli_runs import cli_env
from training.conftest import QUICK, REPO_ROOT, compose_config, run_train_cli  # noqa: F401

#: QUICK (3 training batches of 2) for 2 epochs on 64-pixel images, one validation batch, no test or plots.
FAST = [
    *(a for a in QUICK if not a.startswith("trainer.max_epochs")),
    "trainer.max_epochs=2",
    "trainer.limit_val_batches=1",
    "test=false",
    "callbacks.plots=null",
    "data.train_scales=[64]",
    "data.train_max_size=96",
    "data.train_crop_resize_scales=[64]",
    "data.train_crop_size=[48,64]",
    "data.val_scale=64",
    "data.val_max_size=96",
]

FAULTY_TRAIN = "tests/robustness/faulty_train.py"


def fast(*extra: str) -> list[str]:
    """:data:`FAST` with ``extra`` overrides (which replace FAST's value of the same key)."""
    keys = {item.split("=", 1)[0] for item in extra}
    return [item for item in FAST if item.split("=", 1)[0] not in keys] + list(extra)


def demo_args(data_root: Path, run_dir: Path, *extra: str) -> list[str]:
    """``train.py`` arguments of a seconds-long demo run into ``run_dir``."""
    return ["experiment=demo", f"data.root={data_root}", f"hydra.run.dir={run_dir}", *fast(*extra)]


class RunningTrain:
    """``python tests/robustness/faulty_train.py ARGS`` in the background, with a fault injected."""

    def __init__(self, args: list[str], cwd: Path, fault: str, env: dict[str, str] | None = None) -> None:
        self.marker = cwd / f"fault-{time.monotonic_ns()}"
        self.log = cwd / f"{self.marker.name}.log"
        self._log_file = self.log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / FAULTY_TRAIN), *args],
            cwd=cwd,
            env={**(env or cli_env()), "DETR_FAULT": fault, "DETR_FAULT_MARKER": str(self.marker)},
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    def wait_for_fault(self, timeout: float = 120) -> None:
        """Block until the injected fault is reached (the process is then stalled there)."""
        deadline = time.monotonic() + timeout
        while not self.marker.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                pytest.fail(f"the fault was never reached:\n{self.output()[-3000:]}")
            time.sleep(0.05)

    def finish(self, timeout: float = 120) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self._log_file.close()

    def output(self) -> str:
        if not self._log_file.closed:
            self._log_file.flush()
        return self.log.read_text(errors="replace")


def run_cli(
    args: list[str],
    cwd: Path,
    env: dict[str, str] | None = None,
    script: str = "train.py",
    timeout: float = 240,
) -> subprocess.CompletedProcess:
    """``python SCRIPT ARGS`` from ``cwd`` as a user runs it (offline), optionally with extra environment.
    A process of its own, not a fork of :mod:`cli_runs`' server: these runs are started from threads and
    beside runs killed by signals."""
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / script), *args],
        cwd=cwd,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def load_checkpoint(path: Path) -> dict:
    """A checkpoint as a resumed run reads it (``weights_only=True``)."""
    return torch.load(path, map_location="cpu", weights_only=True)
