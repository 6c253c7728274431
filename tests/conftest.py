"""Shared test helpers: the location of ../shared and tiny model builders."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from detr_lightning.config import register_configs
from detr_lightning.data.demo import ensure_demo_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("DETR_LIGHTNING_SHARED", REPO_ROOT.parent / "shared"))
OFFICIAL_FIXTURES = SHARED_DIR / "fixtures" / "official_detr"

register_configs()  # as train.py and eval.py do: the schemas that conf/ composes with

#: Under pytest-xdist (``make test``: ``-n 2 --dist loadgroup``), the tests that read the one demo sweep run
#: in one worker, which runs the sweep once (see :func:`pytest_collection_modifyitems`).
DEMO_SWEEP_GROUP = "demo_sweep"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: a module of seconds-long runs (processes, exports); scheduled first under xdist"
    )
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:  # one worker per core: its in-process torch ops take their share, not every core each
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(workers)))


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In an xdist worker: each test module is one unit of work (its module fixtures run once), except the
    tests of the demo sweep, one unit together; the slow units first, so no worker ends with a long one."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    for item in items:
        group = DEMO_SWEEP_GROUP if DEMO_SWEEP_GROUP in item.fixturenames else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))
    items.sort(
        key=lambda item: not (item.get_closest_marker("slow") or DEMO_SWEEP_GROUP in item.fixturenames)
    )


def pytest_xdist_node_collection_finished(node, ids: list[str]) -> None:
    """``--dist loadgroup`` reads a test's group from the ``@group`` suffix xdist adds to its node id; a
    pytest that drops the suffix (9.2, xdist#1386) would silently spread the groups: stop instead."""
    if node.config.getvalue("dist") != "loadgroup":
        return
    lost = next((nodeid for nodeid in ids if "@" not in nodeid), None)
    if lost:
        pytest.exit(f"xdist lost the group of {lost} (pytest {pytest.__version__}): use pytest<9.2", 4)


@pytest.fixture(autouse=True)
def _never_download(monkeypatch):
    """Tests never touch the network: downloads fail fast as they do offline (ours and the Hugging Face
    hub's; transformers also reads HF_HUB_OFFLINE in the subprocesses tests start)."""
    monkeypatch.setenv("DETR_LIGHTNING_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def official_fixtures() -> Path:
    """``../shared/fixtures/official_detr``; skips when the shared folder is not beside the repo."""
    if not (OFFICIAL_FIXTURES / "tiny" / "checkpoint.pth").is_file():
        pytest.skip(f"official DETR fixtures not found at {OFFICIAL_FIXTURES} (../shared is absent)")
    return OFFICIAL_FIXTURES


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory) -> Path:
    """The demo dataset with 12/6/6 images (same generator as the built-in one)."""
    return ensure_demo_dataset(tmp_path_factory.mktemp("data") / "demo", num_train=12, num_val=6, num_test=6)


def credential_free_env(home: Path) -> dict[str, str]:
    """This process's environment without any W&B setting or credential, with HOME in a temporary folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    return {**env, "HOME": str(home), "DETR_LIGHTNING_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


@dataclass
class DemoSweep:
    result: subprocess.CompletedProcess
    path: Path
    jobs: list[Path]


@pytest.fixture(scope="session")
def demo_sweep(small_demo, tmp_path_factory) -> DemoSweep:
    """``python train.py -m experiment=demo logger=wandb loss.bbox_loss_coef=2,5``, as a user runs it with no
    W&B credentials: two jobs of 2 epochs (one training step each, every val/test image in one batch, no
    sanity check, no ``last.ckpt``, 4 images in ``val_predictions.png``).
    The one real sweep of the suite: the sweep summary, report, plot and W&B tests all read it."""
    work_dir = tmp_path_factory.mktemp("demo_sweep")
    sweep_dir = work_dir / "sweep"
    arguments = [
        "-m",
        "experiment=demo",
        "logger=wandb",
        f"data.root={small_demo}",
        f"hydra.sweep.dir={sweep_dir}",
        "loss.bbox_loss_coef=2,5",
        # An untrained model scores low: draw every query in the plots and W&B images.
        "callbacks.plots.score_threshold=0",
        "callbacks.wandb_media.score_threshold=0",
        # A grid row of 4 images is drawn faster than 6 in two; W&B still gets every val image (8 > 6).
        "callbacks.plots.num_images=4",
        "callbacks.progress_bar=null",
        "trainer.accelerator=cpu",
        "trainer.num_sanity_val_steps=0",
        "callbacks.model_checkpoint.save_last=false",  # the test stage reads best.ckpt, nothing last.ckpt
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "data.batch_size=2",
        "data.val_batch_size=6",
        "data.num_workers=0",
        "data.persistent_workers=false",
    ]
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train.py"), *arguments],
        cwd=work_dir,
        env=credential_free_env(work_dir / "home"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(path for path in sweep_dir.iterdir() if path.is_dir() and path.name.isdigit())
    assert [job.name for job in jobs] == ["0", "1"]
    return DemoSweep(result, sweep_dir, jobs)
