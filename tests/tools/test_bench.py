"""The benchmark CLI (``python -m detr_lightning.tools.bench``): its inputs and its output contract."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from detr_lightning.tools.bench import main, synthetic_detections

pytestmark = pytest.mark.slow


def test_synthetic_detections_are_valid_xywh():
    predictions, targets = synthetic_detections(5, 10)
    assert len(predictions) == len(targets) == 5
    for prediction, target in zip(predictions, targets, strict=True):
        assert prediction["boxes"].shape == (10, 4) and prediction["scores"].shape == (10,)
        assert (prediction["boxes"][:, 2:] > 0).all() and (target["boxes"][:, 2:] > 0).all()


def run_bench(*args: str) -> dict:
    """``python -m detr_lightning.tools.bench ARGS`` as a user runs it: the JSON line it ends with."""
    result = subprocess.run(
        [sys.executable, "-m", "detr_lightning.tools.bench", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])  # the JSON line is always last


def bench_in_process(capsys, *args: str) -> dict:
    """The same, in this process (no second start of torch): ``main(ARGS)``'s last printed line."""
    main(list(args))
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("args", [["train-step", "--steps", "0"], ["train-e2e", "--rounds", "-1"]])
def test_counts_below_one_are_refused_by_the_parser(capsys, args):
    with pytest.raises(SystemExit) as stopped:
        main(args)
    assert stopped.value.code == 2 and "is not 1 or more" in capsys.readouterr().err


def test_metric_benchmark_backends_agree():
    figures = run_bench("metric", "--images", "30", "--detections", "20")
    assert figures["benchmark"] == "metric"
    assert figures["max_abs_difference"] == 0.0
    assert 0 < figures["map"] < 1
    assert figures["faster_coco_eval_s"] > 0 and figures["pycocotools_s"] > 0
    assert {"cpu", "cpu_cores", "torch"} <= set(figures)


def test_data_benchmark_reports_images_per_second(capsys):
    figures = bench_in_process(capsys, "data", "--images", "6", "--workers", "0")
    assert figures["workers0_images_per_s"] > 0


def test_train_step_benchmark_runs_one_official_layout_step_with_breakdown(capsys):
    figures = bench_in_process(
        capsys,
        "train-step",
        *("--steps", "1", "--warmup", "0", "--device", "cpu"),
        *("--breakdown", "--no-flops", "--no-fold-norm", "--attention-weights"),
    )
    assert figures["impl"] == "ours" and figures["steps"] == 1
    assert figures["fold_norm"] is False and figures["attention_weights"] is True
    assert figures["median_s"] > 0 and figures["peak_memory_mib"] > 0
    for phase in ("forward", "loss", "backward", "optimizer"):
        assert figures[f"{phase}_median_s"] > 0


#: A seconds-long train.py run on the small demo set: tiny DETR, frozen backbone, small images.
TINY_RUN = [
    *("backbone=resnet18", "transformer=tiny", "model.num_queries=5", "optimizer.lr_backbone=0"),
    *("data.batch_size=4", "data.val_batch_size=2", "data.num_workers=0", "data.persistent_workers=false"),
    *("data.train_scales=[64,80]", "data.train_max_size=128", "data.train_crop_resize_scales=[64]"),
    *("data.train_crop_size=[48,64]", "data.val_scale=64", "data.val_max_size=128"),
    *("trainer.limit_val_batches=1", "callbacks.plots=null"),
]
#: speed=gpu as a CPU can run it: no compilation, no workers, nothing process-wide (cudnn.benchmark).
CPU_SPEED_GPU = "speed=gpu speed.compile=false data.num_workers=0 data.persistent_workers=false "
CPU_SPEED_GPU += "data.pin_memory=false trainer.benchmark=null"


def test_train_e2e_times_the_real_training_loop_of_interleaved_settings(capsys, small_demo, tmp_path):
    """Two settings through train.py's flow (in this process): steps timed after the warm-up, the
    validation epoch (12 images at batch 4: after the 3rd step, inside the timed window) apart. ``--data``
    is read as it is: here the demo images in the official COCO layout, which is no demo folder."""
    coco = tmp_path / "coco"
    for split, folder in (("train", "train"), ("val", "valid")):
        (coco / "annotations").mkdir(parents=True, exist_ok=True)
        annotations = (small_demo / folder / "_annotations.coco.json").read_text()
        (coco / "annotations" / f"instances_{split}2017.json").write_text(annotations)
        (coco / f"{split}2017").symlink_to(small_demo / folder, target_is_directory=True)
    overrides = [argument for override in TINY_RUN for argument in ("--override", override)]
    figures = bench_in_process(
        capsys,
        "train-e2e",
        *("--device", "cpu", "--in-process", "--data", str(coco), "--out-dir", str(tmp_path / "out")),
        *("--steps", "3", "--warmup-steps", "1", "--profile-steps", "0", "--flop-steps", "1"),
        *overrides,
        *("--setting", "baseline=", "--setting", f"fast={CPU_SPEED_GPU}"),
    )
    assert figures["benchmark"] == "train-e2e" and figures["steps"] == 3
    summary = figures["summary"]
    assert summary["baseline"]["runs"] == summary["fast"]["runs"] == 1
    assert summary["fast"]["speedup_vs_baseline"] > 0 and summary["fast"]["model_tflop_s"] > 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "runs.jsonl").read_text().splitlines()]
    assert [row["setting"] for row in rows] == ["baseline", "fast"]
    for row in rows:
        assert row["timed_steps"] == 3 and row["images"] == 12
        assert row["train_images_per_s"] > row["e2e_images_per_s"] > 0  # validation and checkpoints apart
        assert row["validation_s"] > 0 and [v["images"] for v in row["validations"]] == [2]
        assert row["step_s"] > row["matching_s"] > 0 and row["data_s"] >= 0 and row["checkpoint_s"] > 0
        parts = ("step_s", "data_s", "epoch_boundary_s", "logger_s", "validation_s", "checkpoint_s")
        assert sum(row[part] for part in parts) == pytest.approx(row["window_s"], abs=0.01)
        assert row["compiled_frames"] == 0 and row["gflop_per_image"] > 0
    assert rows[1]["batch_shapes"] == 1 < rows[0]["batch_shapes"]  # buckets of 128 against 64-128 px
    tsv = (tmp_path / "out" / "runs.tsv").read_text().splitlines()
    assert tsv[0].startswith("setting\tround\ttrain_images_per_s") and len(tsv) == 3


def test_train_e2e_settings_and_the_runs_overrides():
    from argparse import Namespace
    from pathlib import Path

    from detr_lightning.tools.e2e import RUN_FRAME, TIMER_TARGET, parse_setting, run_overrides

    assert parse_setting("baseline=") == ("baseline", [])
    assert parse_setting("fast=speed=gpu speed.compile_mode=max-autotune") == (
        "fast",
        ["speed=gpu", "speed.compile_mode=max-autotune"],
    )
    with pytest.raises(SystemExit, match="NAME=OVERRIDES"):
        parse_setting("=speed=gpu")
    args = Namespace(
        **{"warmup_steps": 2, "steps": 10, "profile_steps": 3, "flop_steps": 1, "sync_steps": False},
        **{"device": "cuda", "data": Path("/d"), "override": ["data.batch_size=4"]},
    )
    overrides = run_overrides(args, ["speed=gpu"], Path("/out/fast_r0"))
    assert overrides[0] == "trainer=gpu" and overrides[-2:] == ["data.batch_size=4", "speed=gpu"]
    assert "trainer.max_steps=16" in overrides and set(RUN_FRAME) <= set(overrides)
    assert f"+callbacks.e2e_timer._target_={TIMER_TARGET}" in overrides
