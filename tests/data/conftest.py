"""Valid tiny datasets in each layout, written into tmp_path; tests then break or reshape them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from .builders import write_split


@pytest.fixture
def roboflow_root(tmp_path: Path) -> Path:
    """A valid Roboflow export with train/valid/test splits of the default set."""
    root = tmp_path / "roboflow"
    for folder in ("train", "valid", "test"):
        write_split(root / folder / "_annotations.coco.json", root / folder)
    return root


@pytest.fixture
def coco_root(tmp_path: Path) -> Callable[[str], Path]:
    """Factory: a valid COCO layout, ``naming`` "instances" (official) or "custom" (fine-tuning fork)."""

    def make(naming: str = "instances") -> Path:
        root = tmp_path / f"coco_{naming}"
        names = {"train": "train2017", "val": "val2017"}
        for split, folder in names.items():
            file_name = f"instances_{folder}.json" if naming == "instances" else f"custom_{split}.json"
            write_split(root / "annotations" / file_name, root / folder)
        return root

    return make
