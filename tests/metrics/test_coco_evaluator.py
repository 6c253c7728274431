"""The CocoEvaluator callback under a real Trainer: logged figures, console, files, DDP."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn

from detr_lightning.callbacks import CocoEvaluator
from detr_lightning.distributed import close_process_group

from .synthetic import (
    IMAGE_IDS,
    LABEL_TO_CATEGORY_ID,
    STAT_KEYS,
    FakeDataModule,
    detections_to_coco_results,
    make_coco_dict,
    make_detections,
    perfect_detections,
    reference_cocoeval,
)


class FixedDetectionsModule(lightning.LightningModule):
    """Returns stored detections for each image id of a batch, as the real module's eval steps do."""

    def __init__(self, detections_by_image: dict[int, dict[str, Tensor]]) -> None:
        super().__init__()
        self.detections_by_image = detections_by_image
        self.weight = nn.Parameter(torch.zeros(1))

    def training_step(self, image_ids: list[int], batch_idx: int) -> Tensor:
        return (self.weight**2).sum()

    def _evaluation_step(self, image_ids: list[int]) -> dict[str, Any]:
        return {"image_ids": image_ids, "detections": [self.detections_by_image[i] for i in image_ids]}

    def validation_step(self, image_ids: list[int], batch_idx: int) -> dict[str, Any]:
        return self._evaluation_step(image_ids)

    def test_step(self, image_ids: list[int], batch_idx: int) -> dict[str, Any]:
        return self._evaluation_step(image_ids)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class CloseProcessGroup(lightning.Callback):
    """What ``train.py``/``eval.py`` do after their last stage, for runs driven from a test: every rank
    closes the gloo group together instead of in its interpreter's shutdown."""

    def teardown(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, stage: str) -> None:
        close_process_group()


def make_trainer(tmp_path: Path, **kwargs: Any) -> lightning.Trainer:
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
        "callbacks": [CocoEvaluator()],
    }
    return lightning.Trainer(**(options | kwargs))


@pytest.fixture(scope="module")
def coco_dict() -> dict[str, Any]:
    return make_coco_dict()


def test_fit_logs_map_of_one_for_perfect_detections_and_writes_files(tmp_path, coco_dict, capsys):
    trainer = make_trainer(tmp_path, max_epochs=1, limit_train_batches=1)
    trainer.fit(FixedDetectionsModule(perfect_detections(coco_dict)), datamodule=FakeDataModule(coco_dict))

    assert trainer.callback_metrics["val/map"] == 1.0
    assert trainer.callback_metrics["val/mar_100"] == 1.0
    assert trainer.callback_metrics["val/ap/traffic light"] == 1.0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["val/map"] == 1.0 and not any(key.startswith("test/") for key in metrics)
    stats, _ = reference_cocoeval(coco_dict, tmp_path / "predictions.coco.json")
    assert stats[0] == 1.0
    printed = capsys.readouterr().out
    # Once for the epoch: the sanity check's two batches are not scored.
    assert (
        printed.count("Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000") == 1
    )
    assert "AP per class" in printed and "traffic light" in printed


def test_validate_equals_pycocotools_on_the_written_files(tmp_path, coco_dict, capsys):
    trainer = make_trainer(tmp_path)
    trainer.validate(FixedDetectionsModule(make_detections(coco_dict)), datamodule=FakeDataModule(coco_dict))

    stats, printed_by_pycocotools = reference_cocoeval(coco_dict, tmp_path / "predictions.coco.json")
    logged = [trainer.callback_metrics[f"val/{name}"].item() for name in STAT_KEYS]
    expected = torch.tensor(stats, dtype=torch.float32).tolist()
    assert logged == expected
    assert 0.2 < logged[0] < 0.8
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [metrics[f"val/{name}"] for name in STAT_KEYS] == expected
    assert {"val/ap/cat", "val/ap/dog", "val/ap/traffic light"} <= set(metrics)
    category_stats, _ = reference_cocoeval(coco_dict, tmp_path / "predictions.coco.json", category_id=7)
    assert metrics["val/ap/traffic light"] == torch.tensor(category_stats[0], dtype=torch.float32).item()

    printed = capsys.readouterr().out.splitlines()
    assert all(line in printed for line in printed_by_pycocotools)
    rows = json.loads((tmp_path / "predictions.coco.json").read_text())
    assert {row["image_id"] for row in rows} == set(IMAGE_IDS)
    assert {row["category_id"] for row in rows} == {1, 3, 7}  # label 3 had no category: dropped


def test_detections_given_to_the_wrong_images_score_lower(tmp_path, coco_dict):
    perfect = perfect_detections(coco_dict)
    rotated = dict(zip(IMAGE_IDS, [perfect[i] for i in IMAGE_IDS[1:] + IMAGE_IDS[:1]], strict=True))
    trainer = make_trainer(tmp_path, callbacks=[CocoEvaluator(print_summary=False, print_per_class=False)])
    trainer.validate(FixedDetectionsModule(rotated), datamodule=FakeDataModule(coco_dict))
    assert trainer.callback_metrics["val/map"] < 0.1


def test_test_logs_under_test_and_writes_test_predictions(tmp_path, coco_dict):
    trainer = make_trainer(
        tmp_path, callbacks=[CocoEvaluator(print_summary=False, output_dir=tmp_path / "out")]
    )
    trainer.test(FixedDetectionsModule(make_detections(coco_dict)), datamodule=FakeDataModule(coco_dict))

    stats, _ = reference_cocoeval(coco_dict, tmp_path / "out" / "predictions_test.coco.json")
    assert trainer.callback_metrics["test/map"].item() == torch.tensor(stats[0], dtype=torch.float32).item()
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["test/map"] == trainer.callback_metrics["test/map"].item()
    assert not (tmp_path / "out" / "predictions.coco.json").exists()


def test_a_step_without_the_contract_outputs_fails_with_the_expected_shape(tmp_path, coco_dict):
    class LossOnlyModule(FixedDetectionsModule):
        def validation_step(self, image_ids: list[int], batch_idx: int) -> Tensor:
            return torch.tensor(0.0)

    trainer = make_trainer(tmp_path)
    with pytest.raises(TypeError, match="'image_ids': list\\[int\\], 'detections'"):
        trainer.validate(LossOnlyModule({}), datamodule=FakeDataModule(coco_dict))


def test_without_a_datamodule_the_error_says_where_ground_truth_comes_from(tmp_path, coco_dict):
    datamodule = FakeDataModule(coco_dict)
    trainer = make_trainer(tmp_path)
    with pytest.raises(TypeError, match="reads ground truth from the datamodule: pass `datamodule=`"):
        trainer.validate(
            FixedDetectionsModule(make_detections(coco_dict)), dataloaders=datamodule.val_dataloader()
        )


def test_ddp_counts_the_image_the_sampler_repeats_once(tmp_path, coco_dict):
    """Two CPU ranks, 9 images: the sampler pads rank 1 with a repeat; the figures are still COCOeval's."""
    detections = make_detections(coco_dict)
    # A broken collective fails after a minute instead of hanging the test run.
    strategy = DDPStrategy(start_method="spawn", timeout=timedelta(seconds=60))
    callbacks = [CocoEvaluator(), CloseProcessGroup()]
    trainer = make_trainer(tmp_path, devices=2, strategy=strategy, callbacks=callbacks)
    trainer.validate(FixedDetectionsModule(detections), datamodule=FakeDataModule(coco_dict))

    expected_rows = detections_to_coco_results(
        IMAGE_IDS, [detections[i] for i in IMAGE_IDS], LABEL_TO_CATEGORY_ID
    )
    stats, _ = reference_cocoeval(coco_dict, expected_rows)
    expected = torch.tensor(stats, dtype=torch.float32).tolist()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [metrics[f"val/{name}"] for name in STAT_KEYS] == expected
    assert trainer.callback_metrics["val/map"].item() == expected[0]
    rows = json.loads((tmp_path / "predictions.coco.json").read_text())
    assert sorted(rows, key=lambda row: row["image_id"]) == sorted(
        expected_rows, key=lambda row: row["image_id"]
    )
