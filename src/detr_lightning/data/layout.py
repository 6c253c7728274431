"""Where a dataset's annotation files and image folders are: layout detection plus explicit overrides.

Recognised layouts under ``data.root=DIR``:

- Roboflow export: ``DIR/{train,valid,test}/_annotations.coco.json`` with the images beside each file.
- COCO / official DETR: ``DIR/annotations/instances_{train,val}2017.json`` with ``DIR/{train,val}2017/``,
  or the ``custom_{train,val}.json`` names of the woctezuma/detr fine-tuning fork.

``data.<split>.ann_file`` / ``data.<split>.img_dir`` override whatever detection found for that split.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from detr_lightning.data.errors import DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")

ROBOFLOW_ANNOTATION_NAME = "_annotations.coco.json"
ROBOFLOW_SPLIT_FOLDERS = {"train": ("train",), "val": ("valid", "val"), "test": ("test",)}
COCO_ANNOTATION_NAMES = {
    "train": ("instances_train2017.json", "custom_train.json"),
    "val": ("instances_val2017.json", "custom_val.json"),
}
COCO_IMAGE_FOLDERS = {"train": "train2017", "val": "val2017"}


@dataclass(frozen=True)
class SplitFiles:
    """One split's annotation file and the folder its ``file_name``s are relative to."""

    split: str
    ann_file: Path
    img_dir: Path


@dataclass(frozen=True)
class DatasetLayout:
    """The splits found for a dataset and how they were found."""

    kind: str
    root: Path | None
    splits: dict[str, SplitFiles]

    def require(self, split: str) -> SplitFiles:
        """The files of ``split``, or a `DataError` saying how to provide them."""
        if split in self.splits:
            return self.splits[split]
        found = ", ".join(self.splits) or "none"
        raise DataError(
            f"no {split} split in {self.root or 'the configured files'} ({self.kind} layout; splits found: "
            f"{found}). Fix: add it in that layout or set data.{split}.ann_file and data.{split}.img_dir."
        )


def _first_found(candidates: dict[str, list[tuple[Path, Path]]]) -> dict[str, SplitFiles]:
    """Per split, the first ``(ann_file, img_dir)`` of its candidates whose annotation file exists."""
    first = {split: next((p for p in pairs if p[0].is_file()), None) for split, pairs in candidates.items()}
    return {split: SplitFiles(split, *pair) for split, pair in first.items() if pair is not None}


def detect_layout(root: Path) -> DatasetLayout | None:
    """The layout found under ``root`` (Roboflow first, then COCO), or ``None`` when neither matches."""
    roboflow = {
        split: [(root / folder / ROBOFLOW_ANNOTATION_NAME, root / folder) for folder in folders]
        for split, folders in ROBOFLOW_SPLIT_FOLDERS.items()
    }
    if splits := _first_found(roboflow):
        return DatasetLayout("Roboflow export", root, splits)
    coco = {
        split: [(root / "annotations" / name, root / COCO_IMAGE_FOLDERS[split]) for name in names]
        for split, names in COCO_ANNOTATION_NAMES.items()
    }
    if splits := _first_found(coco):
        official = all(files.ann_file.name.startswith("instances_") for files in splits.values())
        return DatasetLayout("COCO" if official else "COCO (custom)", root, splits)
    return None


def _resolve_path(value: str | Path, root: Path | None) -> Path:
    path = Path(value).expanduser()
    return root / path if root is not None and not path.is_absolute() else path


def resolve_layout(
    root: str | Path | None,
    overrides: Mapping[str, Mapping[str, str | Path | None] | None] | None = None,
) -> DatasetLayout:
    """Detect the layout under ``root`` (``None``: every split is given) and apply the per-split
    ``{split: {"ann_file": ..., "img_dir": ...}}`` overrides, relative to ``root`` when set; logs one line.

    An ``ann_file`` without ``img_dir`` reads images from the folder detection found for that split, else
    from the annotation file's folder (as in Roboflow exports).
    """
    root_path = Path(root).expanduser() if root is not None else None
    if root_path is not None and not root_path.is_dir():
        raise DataError(f"data.root={root_path} is not a folder. Fix: point data.root at the dataset folder.")
    detected = detect_layout(root_path) if root_path is not None else None
    splits = dict(detected.splits) if detected is not None else {}
    overridden = False
    for split, paths in (overrides or {}).items():
        if split not in SPLITS:
            raise DataError(f"data.{split}: unknown split. Fix: use one of {', '.join(SPLITS)}.")
        ann_value, img_value = (paths or {}).get("ann_file"), (paths or {}).get("img_dir")
        if ann_value is None and img_value is None:
            continue
        overridden = True
        found = splits.get(split)
        if ann_value is None and found is None:
            raise DataError(
                f"data.{split}.img_dir={img_value} is set but no annotation file was found for the {split} "
                f"split. Fix: also set data.{split}.ann_file."
            )
        ann_file = _resolve_path(ann_value, root_path) if ann_value is not None else found.ann_file
        default_img_dir = found.img_dir if found is not None else ann_file.parent
        img_dir = _resolve_path(img_value, root_path) if img_value is not None else default_img_dir
        splits[split] = SplitFiles(split, ann_file, img_dir)
    if not splits and root_path is None:
        raise DataError(
            "data.root is not set and no split is given explicitly. Fix: set data.root=DIR or "
            "data.train.ann_file and data.train.img_dir."
        )
    if not splits:
        raise DataError(
            f"no dataset found in {root_path}: expected a Roboflow export "
            f"({root_path}/train/{ROBOFLOW_ANNOTATION_NAME}, valid/, test/) or a COCO layout "
            f"({root_path}/annotations/instances_train2017.json with {root_path}/train2017/). "
            "Fix: point data.root at such a folder or set data.train.ann_file and data.train.img_dir."
        )
    kind = "explicit" if detected is None else detected.kind + (" + explicit overrides" if overridden else "")
    ordered = {split: splits[split] for split in SPLITS if split in splits}
    chosen = "; ".join(
        f"{split}={files.ann_file} (images in {files.img_dir})" for split, files in ordered.items()
    )
    log.info("data: %s layout%s: %s", kind, f" in {root_path}" if root_path is not None else "", chosen)
    return DatasetLayout(kind, root_path, ordered)
