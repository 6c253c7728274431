"""`CocoDataModule`: COCO-format splits, the data check, DETR transforms and the loaders.

The loaders build their own samplers (see `detr_lightning.data.samplers`), which Lightning leaves alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import lightning
import torch
from pycocotools.coco import COCO
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from detr_lightning.data import transforms as T
from detr_lightning.data.categories import LabelMap, build_label_map, check_label_mapping
from detr_lightning.data.check import CheckedSplit, load_split
from detr_lightning.data.coco import CocoDetection
from detr_lightning.data.collate import collate_detection
from detr_lightning.data.demo import ensure_demo_dataset
from detr_lightning.data.errors import DataError
from detr_lightning.data.layout import DatasetLayout, detect_layout, resolve_layout
from detr_lightning.data.samplers import EpochSeededDataset, EpochShuffleSampler, EvalShardSampler

STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}


def _positive_ints(name: str, values: Sequence[int]) -> tuple[int, ...]:
    result = tuple(int(value) for value in values)
    if not result or any(value <= 0 for value in result):
        raise DataError(f"data.{name}={list(values)} must be a non-empty list of positive sizes in pixels.")
    return result


class CocoDataModule(lightning.LightningDataModule):
    """COCO-format detection data for DETR.

    Args:
        root: Roboflow export or COCO layout (see `detr_lightning.data.layout`).
        label_mapping: ``"raw"`` or ``"contiguous"`` (see `detr_lightning.data.categories`).
        train, val, test: ``{"ann_file": ..., "img_dir": ...}`` overriding detection for that split.
        batch_size: per process; a ``None`` ``val_batch_size`` means the same.
        pin_memory: ``None`` pins when CUDA is available.
        pad_to_multiple: shape buckets: every batch (training and evaluation) is padded up to multiples
            of this many pixels in height and width (masked like DETR's other padding), so the batch
            shapes of an epoch are few (``torch.compile`` with static shapes, CUDA graphs). ``None``: to
            the largest image of the batch only (official). A multiple of 32 (the backbone's stride)
            aligns the mask's down-sampling with the stride (feature row ``i`` reads pixel row ``32 i``).
        train_scales, train_max_size: shorter-side choices and longer-side cap of the multi-scale resize.
        train_crop_resize_scales, train_crop_size: the crop branch's resize choices and ``(min, max)`` crop.
        seed: of shuffling and augmentation; each rank adds its rank for its workers.
        check_images: verify every image file (presence, format, size) in `setup`.
        drop_last: of training batches (the official code drops the last, incomplete one).
        generate_demo: write the demo dataset to ``root`` if no dataset is there.
        demo_root: if set, the only ``root`` the demo is written to (a mistyped ``data.root`` is an error).
        demo_options: `detr_lightning.data.demo.write_demo_dataset` options (the harder variant's in
            ``data=demo_crowded``).
    """

    def __init__(
        self,
        root: str | Path | None = None,
        label_mapping: str = "raw",
        train: Mapping[str, str | Path | None] | None = None,
        val: Mapping[str, str | Path | None] | None = None,
        test: Mapping[str, str | Path | None] | None = None,
        batch_size: int = 2,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        pin_memory: bool | None = None,
        persistent_workers: bool = False,
        pad_to_multiple: int | None = None,
        train_scales: Sequence[int] = T.DETR_TRAIN_SCALES,
        train_max_size: int | None = T.DETR_TRAIN_MAX_SIZE,
        train_crop_resize_scales: Sequence[int] = T.DETR_CROP_RESIZE_SCALES,
        train_crop_size: Sequence[int] = T.DETR_CROP_SIZE,
        val_scale: int = T.DETR_EVAL_SCALE,
        val_max_size: int | None = T.DETR_EVAL_MAX_SIZE,
        seed: int = 42,
        check_images: bool = True,
        drop_last: bool = True,
        generate_demo: bool = False,
        demo_root: str | Path | None = None,
        demo_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.root = Path(root).expanduser() if root is not None else None
        check_label_mapping(label_mapping)
        self.label_mapping = label_mapping
        self.split_overrides = {
            name: dict(paths) for name, paths in (("train", train), ("val", val), ("test", test)) if paths
        }
        if batch_size <= 0 or (val_batch_size is not None and val_batch_size <= 0):
            raise DataError(
                f"data.batch_size={batch_size}, data.val_batch_size={val_batch_size}: must be positive."
            )
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size) if val_batch_size is not None else self.batch_size
        self.num_workers = int(num_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.persistent_workers = bool(persistent_workers) and self.num_workers > 0
        if pad_to_multiple is not None and pad_to_multiple <= 0:
            raise DataError(
                f"data.pad_to_multiple={pad_to_multiple} must be a positive number of pixels (e.g. 128), "
                "or null for no shape buckets."
            )
        self.pad_to_multiple = pad_to_multiple
        scales = _positive_ints("train_scales", train_scales)
        crop_resize_scales = _positive_ints("train_crop_resize_scales", train_crop_resize_scales)
        crop_size = _positive_ints("train_crop_size", train_crop_size)
        if len(crop_size) != 2 or crop_size[0] > crop_size[1]:
            raise DataError(
                f"data.train_crop_size={list(train_crop_size)} must be [min, max] with min <= max."
            )
        val_scale = _positive_ints("val_scale", [val_scale])[0]
        train_geometry = T.make_train_geometry(scales, train_max_size, crop_resize_scales, crop_size)
        self.train_transform = T.DetectionTransform(train_geometry)
        self.eval_transform = T.DetectionTransform(T.make_eval_geometry(val_scale, val_max_size))
        self.seed = int(seed)
        self.check_images = check_images
        self.drop_last = drop_last
        self.generate_demo = generate_demo
        self.demo_root = Path(demo_root).expanduser() if demo_root is not None else None
        self.demo_options = dict(demo_options or {})
        self._splits: dict[str, CheckedSplit] = {}
        self._datasets: dict[str, CocoDetection] = {}

    def prepare_data(self) -> None:
        """Write the demo dataset if asked to and nothing is at ``root`` (atomic, so ranks may race)."""
        if (
            self.generate_demo
            and self.root is not None
            and (self.demo_root is None or self.demo_root.resolve() == self.root.resolve())
            and not (self.root.is_dir() and detect_layout(self.root))
        ):
            ensure_demo_dataset(self.root, **self.demo_options)

    @cached_property
    def layout(self) -> DatasetLayout:
        """The splits' files (detected once, logged in one line)."""
        self.prepare_data()
        return resolve_layout(self.root, self.split_overrides)

    def has_split(self, split: str) -> bool:
        return split in self.layout.splits

    def checked_split(self, split: str) -> CheckedSplit:
        """The split's annotation file after the record check and box repairs (read once)."""
        if split not in self._splits:
            self._splits[split] = load_split(self.layout.require(split))
        return self._splits[split]

    @cached_property
    def label_map(self) -> LabelMap:
        """Labels of every split in the layout; reads the annotation files, not the images."""
        splits = [self.checked_split(split) for split in self.layout.splits]
        return build_label_map([(s.files.ann_file, s.data) for s in splits], self.label_mapping)

    # What the model and the callbacks read of the label map (see `LabelMap`).
    @property
    def num_classes(self) -> int:
        return self.label_map.num_classes

    @property
    def class_names(self) -> dict[int, str]:
        return self.label_map.class_names

    @property
    def label_to_category_id(self) -> dict[int, int]:
        return self.label_map.label_to_category_id

    def check_num_classes(self, num_classes: int) -> None:
        self.label_map.check_num_classes(num_classes)

    def coco_gt(self, split: str) -> COCO:
        """pycocotools index of the split's annotation file: original ids, crowd boxes, repaired boxes."""
        return self.checked_split(split).coco

    def setup(self, stage: str | None = None) -> None:
        """Check the stage's splits (annotations and, if ``check_images``, every image) and build datasets."""
        label_map = self.label_map  # every split's annotations are checked before any image
        for name in STAGE_SPLITS.get(stage, tuple(self.layout.splits)):
            split = self.checked_split(name)
            if self.check_images:
                split.verify_images()
            if name not in self._datasets:
                self._datasets[name] = CocoDetection(
                    split.coco,
                    split.files.img_dir,
                    label_map,
                    transform=self.train_transform if name == "train" else self.eval_transform,
                    images_read_unrotated=split.images_read_unrotated,
                    ann_file=split.files.ann_file,
                )

    def dataset(self, split: str) -> CocoDetection:
        """The dataset of ``split``: "train", "val" or "test" (built by `setup`)."""
        if split not in self._datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[split])
        return self._datasets[split]

    def _replicas(self) -> tuple[int, int]:
        """``(number of ranks, this rank)`` as the attached Trainer has them; ``(1, 0)`` without one."""
        kwargs = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        return (kwargs["num_replicas"], kwargs["rank"]) if kwargs else (1, 0)

    def _loader(
        self, dataset: Dataset, sampler: DistributedSampler, batch_size: int, drop_last: bool
    ) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            collate_fn=(
                collate_detection
                if self.pad_to_multiple is None
                else partial(collate_detection, pad_to_multiple=self.pad_to_multiple)
            ),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            generator=torch.Generator().manual_seed(self.seed + sampler.rank),
        )

    def train_dataloader(self) -> DataLoader:
        dataset = self.dataset("train")
        num_replicas, rank = self._replicas()
        # Order and augmentation depend only on (seed, epoch): resuming at an epoch boundary is exact.
        sampler = EpochShuffleSampler(dataset, num_replicas=num_replicas, rank=rank, seed=self.seed)
        sampler.set_epoch(self._next_train_epoch())
        if self.drop_last and len(sampler) < self.batch_size:
            raise DataError(
                f"the train split has {len(dataset)} images ({len(sampler)} per process), fewer than "
                f"data.batch_size={self.batch_size}, so no full batch exists. Fix: lower data.batch_size "
                "or set data.drop_last=false."
            )
        return self._loader(EpochSeededDataset(dataset, self.seed), sampler, self.batch_size, self.drop_last)

    def _next_train_epoch(self) -> int:
        """The epoch the train loader is about to serve.

        Lightning creates a resumed run's first iterator (and with workers, prefetches from the sampler)
        before it sets the sampler's epoch, and counts the epoch whose validation wrote the checkpoint
        as done only later; without this the first resumed epoch would repeat epoch 0's order.
        """
        fit_loop = getattr(self.trainer, "fit_loop", None)  # None without a Trainer
        if fit_loop is None:
            return 0
        progress = fit_loop.epoch_progress.current
        finished = fit_loop.epoch_loop.batch_progress.is_last_batch
        return progress.processed + int(finished and progress.processed < progress.started)

    def _eval_loader(self, split: str) -> DataLoader:
        dataset = self.dataset(split)
        num_replicas, rank = self._replicas()
        sampler = EvalShardSampler(dataset, num_replicas=num_replicas, rank=rank)
        return self._loader(dataset, sampler, self.val_batch_size, drop_last=False)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
