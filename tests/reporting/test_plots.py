"""`TrainingPlots`: the PNG files of a real run, redrawing per epoch, resuming, W&B images, failures."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from detr_lightning.callbacks import EpochMetricsCSV
from detr_lightning.callbacks import plots as plots_module
from detr_lightning.callbacks.plots import (
    METRICS_PLOT,
    PREDICTIONS_PLOT,
    PredictionPanel,
    TrainingPlots,
    plot_metrics,
    plot_predictions,
)
from detr_lightning.data import CocoDataModule
from detr_lightning.runs import read_epoch_rows

from .conftest import fake_trainer


def check_png(path: Path, min_size: tuple[int, int], max_side: int = 4000) -> np.ndarray:
    """A complete PNG of sensible size that is not one flat colour; its pixels."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()  # a truncated file fails here
        width, height = image.size
        pixels = np.asarray(image.convert("RGB"))
    assert min_size[0] <= width <= max_side and min_size[1] <= height <= max_side, (path, image.size)
    assert pixels.std() > 5, f"{path} is blank"
    return pixels


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def epoch_metrics(row: dict[str, str]) -> dict[str, torch.Tensor]:
    """A metrics.csv row as the trainer's callback_metrics of that epoch (``train/*`` as ``*_epoch``)."""
    metrics = {}
    for key, value in row.items():
        if key in ("epoch", "step") or key.startswith("lr") or value == "":
            continue
        name = f"{key}_epoch" if key.startswith("train/") else key
        metrics[name] = torch.tensor(float(value))
    return metrics


class FakeWandbLogger(WandbLogger):
    """A `WandbLogger` to the callback (isinstance), recording what it is asked to log; starts no run."""

    def __init__(self) -> None:
        self.logged: list[tuple[dict, int | None]] = []

    def log_metrics(self, metrics, step=None) -> None:
        self.logged.append((dict(metrics), step))


@pytest.fixture(scope="module")
def datamodule(demo_data) -> CocoDataModule:
    return CocoDataModule(root=demo_data, num_workers=0, check_images=False)


def validation_outputs(datamodule: CocoDataModule, score: float) -> dict:
    """One validation batch's step output covering every val image: a box per image at ``score``."""
    image_ids = sorted(datamodule.coco_gt("val").imgs)
    detections = [
        {
            "boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [5.0, 5.0, 20.0, 20.0]]),
            "scores": torch.tensor([score, 0.01]),
            "labels": torch.tensor([1, 2]),
        }
        for _ in image_ids
    ]
    return {"image_ids": image_ids, "detections": detections}


# ---------------------------------------------------------------------- a real run
def test_a_training_run_writes_both_plots(sweep):
    for job in sweep.jobs:
        plots_dir = job / "plots"
        check_png(plots_dir / METRICS_PLOT, min_size=(1000, 500))
        check_png(plots_dir / PREDICTIONS_PLOT, min_size=(600, 300))
        assert not list(plots_dir.glob(".*.tmp"))  # written through a temporary file and a rename


def test_metrics_plot_from_a_runs_metrics_csv(sweep, tmp_path):
    rows = read_epoch_rows(sweep.jobs[0])
    assert [row["epoch"] for row in rows] == ["0", "1"]
    first = plot_metrics(rows[:1], tmp_path / "one.png")
    both = plot_metrics(rows, tmp_path / "two.png")
    check_png(first, min_size=(1000, 500))
    check_png(both, min_size=(1000, 500))
    assert digest(first) != digest(both)


# ---------------------------------------------------------------------- the callback, without a Trainer
def test_metrics_plot_is_redrawn_after_every_epoch(sweep, tmp_path):
    rows = read_epoch_rows(sweep.jobs[0])
    callback = TrainingPlots(output_dir=tmp_path / "plots")
    path = tmp_path / "plots" / METRICS_PLOT
    digests = []
    for epoch, row in enumerate(rows):
        trainer = fake_trainer(tmp_path, current_epoch=epoch, global_step=3 * (epoch + 1))
        trainer.callback_metrics = epoch_metrics(row)
        callback.on_train_epoch_end(trainer, None)
        check_png(path, min_size=(1000, 500))
        digests.append(digest(path))
        assert [r["epoch"] for r in callback.rows] == list(range(epoch + 1))
    assert digests[0] != digests[1]
    assert callback.rows[1]["val/map"] == pytest.approx(float(rows[1]["val/map"]))
    assert callback.rows[1]["train/loss"] == pytest.approx(float(rows[1]["train/loss"]))


def test_a_resumed_run_plots_the_earlier_epochs(sweep, tmp_path):
    rows = read_epoch_rows(sweep.jobs[0])
    first = TrainingPlots(output_dir=tmp_path / "first")
    first.on_train_epoch_end(fake_trainer(tmp_path, callback_metrics=epoch_metrics(rows[0])), None)

    resumed = TrainingPlots(output_dir=tmp_path / "resumed")
    resumed.load_state_dict(first.state_dict())  # what the checkpoint carries
    trainer = fake_trainer(tmp_path, current_epoch=1, callback_metrics=epoch_metrics(rows[1]))
    resumed.on_train_epoch_end(trainer, None)
    assert [r["epoch"] for r in resumed.rows] == [0, 1]

    # A checkpoint without this callback's state: the rows EpochMetricsCSV restored fill the history in.
    csv_callback = EpochMetricsCSV(output_dir=tmp_path)
    csv_callback.load_state_dict({"rows": [{"epoch": 0, "step": 3, **{"val/map": 0.25}}]})
    late = TrainingPlots(output_dir=tmp_path / "late")
    trainer = fake_trainer(
        tmp_path, current_epoch=1, callback_metrics=epoch_metrics(rows[1]), callbacks=[csv_callback]
    )
    late.on_train_epoch_end(trainer, None)
    assert [r["epoch"] for r in late.rows] == [0, 1] and late.rows[0]["val/map"] == 0.25
    check_png(tmp_path / "late" / METRICS_PLOT, min_size=(1000, 500))


def test_validation_grid_and_wandb_images(datamodule, tmp_path):
    logger = FakeWandbLogger()
    callback = TrainingPlots(output_dir=tmp_path / "plots", num_images=4, score_threshold=0.5)
    trainer = fake_trainer(tmp_path, datamodule=datamodule, loggers=[logger], global_step=6, current_epoch=1)
    callback.on_validation_epoch_start(trainer, None)
    assert callback._image_ids == sorted(datamodule.coco_gt("val").imgs)[:4]  # the same images every epoch
    callback.on_validation_batch_end(trainer, None, validation_outputs(datamodule, score=0.9), None, 0)
    assert all(len(d["scores"]) == 1 for d in callback._epoch_detections.values())  # 0.01 < threshold
    callback.on_validation_epoch_end(trainer, None)
    check_png(tmp_path / "plots" / PREDICTIONS_PLOT, min_size=(600, 300))

    trainer.callback_metrics = {"train/loss_epoch": torch.tensor(3.0), "val/loss": torch.tensor(2.5)}
    callback.on_train_epoch_end(trainer, None)

    import wandb

    logged = {key: (value, step) for metrics, step in logger.logged for key, value in metrics.items()}
    assert set(logged) == {"plots/val_predictions", "plots/metrics"}
    for image, step in logged.values():
        assert isinstance(image, wandb.Image) and step == 6


def test_nothing_is_logged_to_wandb_without_a_wandb_logger_or_when_turned_off(datamodule, tmp_path):
    logger = FakeWandbLogger()
    callback = TrainingPlots(output_dir=tmp_path, log_to_wandb=False)
    callback.on_train_epoch_end(fake_trainer(tmp_path, loggers=[logger]), None)
    assert logger.logged == [] and (tmp_path / METRICS_PLOT).is_file()


def test_the_sanity_check_draws_nothing(datamodule, tmp_path):
    callback = TrainingPlots(output_dir=tmp_path)
    trainer = fake_trainer(tmp_path, datamodule=datamodule, sanity_checking=True)
    callback.on_validation_epoch_start(trainer, None)
    callback.on_validation_batch_end(trainer, None, validation_outputs(datamodule, 0.9), None, 0)
    callback.on_validation_epoch_end(trainer, None)
    callback.on_train_epoch_end(trainer, None)
    assert not list(tmp_path.iterdir())


def test_plot_predictions_draws_a_grid_with_a_legend(tmp_path):
    rng = np.random.default_rng(0)
    panels = [
        PredictionPanel(
            image_id=image_id,
            pixels=rng.integers(0, 255, size=(120, 160, 3), dtype=np.uint8),
            predictions={
                "boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]),
                "scores": torch.tensor([0.87]),
                "labels": torch.tensor([7]),
            },
            ground_truth={
                "boxes": torch.tensor([[12.0, 8.0, 48.0, 64.0]], dtype=torch.float64),
                "labels": torch.tensor([1]),
            },
        )
        for image_id in range(5)
    ]
    path = plot_predictions(panels, tmp_path / "grid.png", class_names={1: "square"}, score_threshold=0.5)
    pixels = check_png(path, min_size=(600, 300))
    red, green = np.array([0xD6, 0x27, 0x28]), np.array([0x2C, 0xA0, 0x2C])
    assert (np.abs(pixels.astype(int) - red).sum(-1) < 30).any()  # predictions are drawn
    assert (np.abs(pixels.astype(int) - green).sum(-1) < 30).any()  # and the ground truth
    empty = plot_predictions([], tmp_path / "empty.png", class_names={}, score_threshold=0.5)
    check_png(empty, min_size=(100, 100))


# ---------------------------------------------------------------------- failures are warnings
def test_a_plotting_failure_only_warns(monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("no fonts today")

    monkeypatch.setattr(plots_module, "plot_metrics", broken)
    callback = TrainingPlots(output_dir=tmp_path)
    trainer = fake_trainer(tmp_path, callback_metrics={"val/map": torch.tensor(0.5)})
    with pytest.warns(UserWarning, match="metrics.png was not drawn.*no fonts today"):
        callback.on_train_epoch_end(trainer, None)
    assert callback.rows  # the history goes on: the next epoch's plot has every epoch


def test_an_unwritable_plots_folder_only_warns(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    callback = TrainingPlots(output_dir=blocker / "plots")
    with pytest.warns(UserWarning, match="metrics.png was not drawn"):
        callback.on_train_epoch_end(fake_trainer(tmp_path), None)


def test_a_wandb_failure_only_warns(tmp_path):
    class BrokenWandbLogger(FakeWandbLogger):
        def log_metrics(self, metrics, step=None) -> None:
            raise ConnectionError("W&B is down")

    callback = TrainingPlots(output_dir=tmp_path)
    with pytest.warns(UserWarning, match="not logged to W&B.*W&B is down"):
        callback.on_train_epoch_end(fake_trainer(tmp_path, loggers=[BrokenWandbLogger()]), None)
    assert (tmp_path / METRICS_PLOT).is_file()


def test_a_datamodule_without_annotations_only_warns(tmp_path):
    callback = TrainingPlots(output_dir=tmp_path)
    trainer = fake_trainer(tmp_path, datamodule=object())
    with pytest.warns(UserWarning, match="no val_predictions.png"):
        callback.on_validation_epoch_start(trainer, None)
    callback.on_validation_batch_end(trainer, None, {"image_ids": [1], "detections": [{}]}, None, 0)
    callback.on_validation_epoch_end(trainer, None)
    assert not (tmp_path / PREDICTIONS_PLOT).exists()
