"""The benchmark CLI (``python -m detr_lightning.tools.bench``): its inputs and its output contract."""

from __future__ import annotations

import json
import subprocess
import sys

from detr_lightning.tools.bench import main, synthetic_detections


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
