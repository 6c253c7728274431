"""Shared test helpers: the location of ../shared and tiny model builders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from detr_lightning.config import register_configs

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("DETR_LIGHTNING_SHARED", REPO_ROOT.parent / "shared"))
OFFICIAL_FIXTURES = SHARED_DIR / "fixtures" / "official_detr"

register_configs()  # as train.py and eval.py do: the schemas that conf/ composes with


@pytest.fixture(autouse=True)
def _never_download(monkeypatch):
    """Tests never touch the network: downloads fail fast as they do offline."""
    monkeypatch.setenv("DETR_LIGHTNING_OFFLINE", "1")


@pytest.fixture(scope="session")
def official_fixtures() -> Path:
    """``../shared/fixtures/official_detr``; skips when the shared folder is not beside the repo."""
    if not (OFFICIAL_FIXTURES / "tiny" / "checkpoint.pth").is_file():
        pytest.skip(f"official DETR fixtures not found at {OFFICIAL_FIXTURES} (../shared is absent)")
    return OFFICIAL_FIXTURES
