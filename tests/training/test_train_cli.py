"""`python train.py ...` as users run it: run directory contents, clear errors, sweeps."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detr_lightning import load_detr

from .conftest import QUICK, run_train_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(small_demo, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """``python train.py experiment=demo`` for one short epoch: its run folder and output. The training run
    of this module: resumed and evaluated by the tests below. One image per validation batch
    (``data.val_batch_size=1``), which :func:`best_evaluated` takes over: see
    :func:`test_ddp_evaluation_equals_single_process`."""
    work_dir = tmp_path_factory.mktemp("demo_run")
    run_dir = work_dir / "run"
    result = run_train_cli(
        [
            "experiment=demo",
            f"data.root={small_demo}",
            f"hydra.run.dir={run_dir}",
            *QUICK,
            "data.val_batch_size=1",
        ],
        cwd=work_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


@pytest.fixture(scope="module")
def best_evaluated(demo_run, tmp_path_factory) -> Path:
    """``python eval.py ckpt_path=<demo run>/checkpoints/best.ckpt`` in one process, with the run's data
    settings (so one image per batch): its output folder."""
    work_dir = tmp_path_factory.mktemp("best_evaluated")
    eval_dir = work_dir / "eval"
    result = run_train_cli(
        [
            f"ckpt_path={demo_run[0] / 'checkpoints' / 'best.ckpt'}",
            f"hydra.run.dir={eval_dir}",
            "data.num_workers=0",
        ],
        cwd=work_dir,
        script="eval.py",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return eval_dir


def test_demo_run_writes_everything_a_user_looks_for(demo_run, best_evaluated, small_demo):
    run_dir, result = demo_run
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in result.stdout
    for name in ("square", "disc", "triangle"):
        assert name in result.stdout  # per-class table with class names

    assert (run_dir / ".hydra" / "config.yaml").is_file()
    for checkpoint in ("best.ckpt", "last.ckpt"):
        model = load_detr(run_dir / "checkpoints" / checkpoint)  # weights_only=True loads it
        assert model.num_classes == 5  # demo category ids go up to 4

    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert len(rows) == 1 and rows[0]["epoch"] == "0"
    for column in ("train/loss", "train/loss_ce", "train/loss_giou_0", "val/loss", "val/map", "val/mar_100"):
        assert rows[0][column] != "", column

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"val/map", "val/map_50", "test/map"} <= set(metrics)

    # Any COCO tool re-scores the written predictions to the logged figure.
    predictions = json.loads((run_dir / "predictions.coco.json").read_text())
    assert predictions and {"image_id", "category_id", "bbox", "score"} <= set(predictions[0])
    assert {p["category_id"] for p in predictions} <= {1, 2, 4}  # original category ids
    ground_truth = COCO(str(small_demo / "valid" / "_annotations.coco.json"))
    evaluation = COCOeval(ground_truth, ground_truth.loadRes(predictions), "bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert abs(evaluation.stats[0] - metrics["val/map"]) < 1e-6

    # eval.py on the best checkpoint reuses the run's data settings and gives the same figures.
    evaluated = json.loads((best_evaluated / "metrics.json").read_text())
    assert abs(evaluated["val/map"] - metrics["val/map"]) < 1e-6
    assert (best_evaluated / "predictions.coco.json").is_file()


def test_missing_data_is_one_clear_message(tmp_path):
    run_dir, nowhere = tmp_path / "run", tmp_path / "nowhere"
    result = run_train_cli(
        [f"data.root={nowhere}", f"hydra.run.dir={run_dir}", *QUICK], cwd=tmp_path, timeout=120
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    message = f"data.root={nowhere} is not a folder. Fix: point data.root at the dataset folder."
    # Once on the console, as the last line; kept in the run's log file.
    assert output.count(message) == 1 and result.stderr.strip().splitlines()[-1] == f"error: {message}"
    assert message in (run_dir / "train.log").read_text()


def test_no_data_says_in_one_line_what_to_pass(tmp_path):
    result = run_train_cli([], cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert (
        last_line.startswith("error: no training data: pass data.root=DIR") and "experiment=demo" in last_line
    )


def test_num_classes_too_small_for_the_data(small_demo, tmp_path):
    result = run_train_cli(
        ["experiment=demo", f"data.root={small_demo}", "model.num_classes=3", *QUICK],
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Traceback" not in output and "num_classes" in output and "5" in output


def test_unknown_config_key_is_rejected(tmp_path):
    result = run_train_cli(["experiment=demo", "optimizer.learning_rate=1"], cwd=tmp_path, timeout=120)
    assert result.returncode != 0 and "learning_rate" in result.stderr


def test_resume_from_last_checkpoint_continues_the_epochs(demo_run, small_demo, tmp_path):
    runs = tmp_path / "outputs" / "demo"
    first, second = runs / "2026-01-01_00-00-00", runs / "2026-01-01_01-00-00"
    args = ["experiment=demo", f"data.root={small_demo}", "test=false", *QUICK]
    shutil.copytree(demo_run[0], first)  # an earlier run of the same experiment, beside this one
    result = run_train_cli(
        [*args, f"hydra.run.dir={second}", "ckpt_path=last", "trainer.max_epochs=2"], cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((second / "metrics.csv").open()))
    assert [row["epoch"] for row in rows][-1] == "1"
    assert str(first / "checkpoints" / "last.ckpt") in result.stdout + result.stderr
    assert [row["epoch"] for row in rows] == ["0", "1"]  # the resumed run keeps the first epoch's row
    state = torch.load(second / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert state["epoch"] == 1
    assert state["optimizer_states"][0]["state"]  # AdamW moments carried over
    assert set(state["class_names"].values()) >= {"square", "disc", "triangle"}  # for predict/export


def test_resume_without_an_earlier_run_says_so(tmp_path):
    result = run_train_cli(
        ["experiment=demo", "ckpt_path=last", f"hydra.run.dir={tmp_path / 'out' / 'x'}"],
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode != 0 and "no earlier run" in result.stderr + result.stdout


def test_fire_extinguishers_fast_dev_run_from_official_format_weights(small_demo, tmp_path):
    """The reference experiment end to end, with a tiny generated file in the official checkpoint format."""
    import argparse

    from detr_lightning.models import build_detr

    official = build_detr(
        num_classes=91,
        backbone="resnet18",
        hidden_dim=64,
        nheads=4,
        enc_layers=2,
        dec_layers=2,
        dim_feedforward=256,
    )
    weights = tmp_path / "detr-tiny-official.pth"
    torch.save(
        {"model": official.state_dict(), "args": argparse.Namespace(nheads=4, dilation=False)}, weights
    )
    result = run_train_cli(
        [
            "experiment=fire_extinguishers",
            f"data.root={small_demo}",
            "model.num_classes=5",  # the demo's ids go up to 4 (the fire-extinguisher data: 2)
            f"model.pretrained={weights}",
            "backbone=resnet18",
            "transformer=tiny",
            "debug=fast_dev_run",
            f"hydra.run.dir={tmp_path / 'run'}",
            *QUICK,
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Re-initialised the class head for num_classes=5" in result.stdout + result.stderr


def test_ddp_evaluation_equals_single_process(demo_run, best_evaluated, tmp_path):
    """The same checkpoint scored by 2 CPU processes (gloo) and by 1: every image once, the same detections
    and the same mAP. One image per batch: DETR's outputs depend on how a batch pads an image (the
    feature grid and its mask), and the two runs batch the images differently. The 1-process run is
    :func:`best_evaluated` (one image per batch from the run's settings)."""
    checkpoint = demo_run[0] / "checkpoints" / "best.ckpt"
    two_processes = tmp_path / "eval_2"
    result = run_train_cli(
        [
            f"ckpt_path={checkpoint}",
            f"hydra.run.dir={two_processes}",
            "data.num_workers=0",
            "data.val_batch_size=1",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
        ],
        cwd=tmp_path,
        script="eval.py",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures, detections = {}, {}
    for devices, out in ((1, best_evaluated), (2, two_processes)):
        figures[devices] = json.loads((out / "metrics.json").read_text())
        detections[devices] = json.loads((out / "predictions.coco.json").read_text())
        assert len({p["image_id"] for p in detections[devices]}) == 6  # every validation image, once
    for key in ("val/map", "val/map_50", "val/mar_100"):
        assert abs(figures[1][key] - figures[2][key]) < 1e-6, key

    def by_image_and_class(predictions):
        groups = {}
        for p in predictions:
            groups.setdefault((p["image_id"], p["category_id"]), []).append(p)
        return {
            key: (sorted(p["score"] for p in group), sorted(p["bbox"] for p in group))
            for key, group in groups.items()
        }

    one, two = by_image_and_class(detections[1]), by_image_and_class(detections[2])
    assert sorted(one) == sorted(two) and len(detections[1]) == len(detections[2]) > 0
    for key, (scores, boxes) in one.items():
        np.testing.assert_allclose(scores, two[key][0], atol=1e-5, err_msg=str(key))
        np.testing.assert_allclose(boxes, two[key][1], atol=1e-3, err_msg=str(key))
