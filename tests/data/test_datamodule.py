from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning
import pytest
import torch
from torch.utils.data import DistributedSampler

import detr_lightning.data.datamodule as datamodule_module
from detr_lightning.data.collate import Batch
from detr_lightning.data.datamodule import CocoDataModule
from detr_lightning.data.demo import ensure_demo_dataset
from detr_lightning.data.errors import DataError

SMALL_SCALES = {
    "train_scales": [24, 32],
    "train_max_size": 64,
    "train_crop_resize_scales": [28, 32],
    "train_crop_size": [16, 24],
    "val_scale": 32,
    "val_max_size": 64,
}


def _module(root: Path, **kwargs) -> CocoDataModule:
    options = {"batch_size": 2, "num_workers": 0, **SMALL_SCALES, **kwargs}
    return CocoDataModule(root, **options)


def test_raw_labels_loaders_and_ground_truth(roboflow_root: Path) -> None:
    module = _module(roboflow_root)
    assert module.num_classes == 4  # ids 0, 1, 3: max id + 1, known before setup
    assert module.class_names == {0: "things", 1: "cat", 3: "dog"}
    assert module.label_to_category_id == {0: 0, 1: 1, 3: 3}
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    assert isinstance(batch, Batch)
    assert batch.images.shape[:2] == (2, 3) and batch.mask.shape == (2, *batch.images.shape[-2:])
    val_batches = list(module.val_dataloader())
    val_ids = [target["image_id"].item() for batch in val_batches for target in batch.targets]
    assert val_ids == [1, 2, 3]
    assert min(int(t["size"].min()) for b in val_batches for t in b.targets) == 32  # shorter side = val_scale
    ground_truth = module.coco_gt("val")
    assert sorted(ground_truth.getAnnIds()) == [10, 11, 12, 13]  # crowd annotation 13 kept for COCOeval
    assert ground_truth.anns[13]["iscrowd"] == 1 and ground_truth.anns[12]["category_id"] == 3
    with pytest.raises(DataError, match=r"model\.num_classes=2 .* at least 4"):
        module.check_num_classes(2)


def test_contiguous_labels(roboflow_root: Path) -> None:
    module = _module(roboflow_root, label_mapping="contiguous")
    assert module.num_classes == 2
    assert module.class_names == {0: "cat", 1: "dog"}
    assert module.label_to_category_id == {0: 1, 1: 3}
    module.setup("validate")
    labels = {
        label for batch in module.val_dataloader() for t in batch.targets for label in t["labels"].tolist()
    }
    assert labels == {0, 1}


def test_coco_layout_through_the_module(coco_root) -> None:
    module = _module(coco_root("custom"))
    module.setup("fit")
    assert len(module.dataset("train")) == 3 and len(module.dataset("val")) == 3
    assert module.has_split("val") and not module.has_split("test")
    with pytest.raises(DataError, match="no test split"):
        module.setup("test")


def test_validation_shards_see_each_image_once_across_ranks(roboflow_root: Path) -> None:
    module = _module(roboflow_root, val_batch_size=1)
    module.setup("fit")
    seen = []
    for rank in range(2):
        module.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": rank})
        seen += [t["image_id"].item() for batch in module.val_dataloader() for t in batch.targets]
        train_loader = module.train_dataloader()
        assert isinstance(train_loader.sampler, DistributedSampler) and train_loader.sampler.rank == rank
    assert sorted(seen) == [1, 2, 3]


def test_setup_runs_the_data_check(roboflow_root: Path) -> None:
    (roboflow_root / "valid" / "b.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"cannot be decoded: \S*valid/b\.png \(image id 2\)"):
        _module(roboflow_root).setup("fit")
    _module(roboflow_root, check_images=False).setup("fit")  # the check can be skipped


def test_too_few_training_images_for_a_full_batch(roboflow_root: Path) -> None:
    module = _module(roboflow_root, batch_size=4)
    module.setup("fit")
    with pytest.raises(DataError, match=r"train split has 3 images .* fewer than data\.batch_size=4"):
        module.train_dataloader()
    assert len(_module(roboflow_root, batch_size=4, drop_last=False).train_dataloader()) == 1


def test_bad_scale_settings_name_the_key(roboflow_root: Path) -> None:
    with pytest.raises(DataError, match=r"data\.train_crop_size=\[60, 40\]"):
        _module(roboflow_root, train_crop_size=[60, 40])
    with pytest.raises(DataError, match=r"data\.train_scales=\[\]"):
        _module(roboflow_root, train_scales=[])
    with pytest.raises(DataError, match=r"data\.label_mapping='ids' is not supported"):
        _module(roboflow_root, label_mapping="ids")


def test_demo_dataset_is_generated_when_asked_and_missing(tmp_path: Path, monkeypatch) -> None:
    def small_demo(path: Path) -> Path:
        return ensure_demo_dataset(path, num_train=6, num_val=4, num_test=4)

    monkeypatch.setattr(datamodule_module, "ensure_demo_dataset", small_demo)
    root = tmp_path / "data" / "demo"
    module = _module(root, generate_demo=True)
    assert module.num_classes == 5 and module.class_names[4] == "triangle"
    assert (root / "valid" / "_annotations.coco.json").is_file()


class _TinyDetector(lightning.LightningModule):
    """Consumes batches the way the real LightningModule will; records the validated image ids."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.validated_ids: list[int] = []

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        assert isinstance(batch, Batch) and batch.mask.dtype == torch.bool
        return self.weight * batch.images.mean() + sum(t["boxes"].sum() for t in batch.targets) * 0

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self.validated_ids += [t["image_id"].item() for t in batch.targets]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fit_with_workers(roboflow_root: Path) -> None:
    model = _TinyDetector()
    trainer = lightning.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=_module(roboflow_root, num_workers=1, persistent_workers=True))
    assert trainer.global_step == 1
    assert sorted(model.validated_ids) == [1, 2, 3]
