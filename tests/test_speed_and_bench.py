"""Speed options (channels_last, fast dropout, freed-memory reuse, torch.compile in place, the speed config
group) and the benchmark CLI's output contract."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT
from detr_lightning.bench import synthetic_detections
from detr_lightning.models import build_detr
from detr_lightning.models.dropout import FastDropout, FastDropoutMultiheadAttention
from detr_lightning.speed import apply_speed_options
from tiny_detr import tiny_detr_kwargs

TINY = tiny_detr_kwargs(dec_layers=1, num_queries=5, dropout=0.0)


def test_channels_last_gives_the_same_outputs():
    torch.manual_seed(0)
    reference = build_detr(**TINY).eval()
    fast = build_detr(**TINY).eval()
    fast.load_state_dict(reference.state_dict())
    apply_speed_options(fast, channels_last=True)
    weights = [p for p in fast.backbone.parameters() if p.dim() == 4]
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    images = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        expected, actual = reference(images), fast(images)
    torch.testing.assert_close(actual["pred_boxes"], expected["pred_boxes"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(actual["pred_logits"], expected["pred_logits"], atol=1e-5, rtol=1e-4)


def test_compile_in_place_keeps_checkpoint_keys():
    model = build_detr(**TINY)
    keys = list(model.state_dict())
    apply_speed_options(model, compile=True, compile_mode="reduce-overhead")
    assert list(model.state_dict()) == keys  # no "_orig_mod." prefix: checkpoints load uncompiled
    assert model._compiled_call_impl is not None


def test_speed_config_group_reaches_the_options():
    from omegaconf import OmegaConf

    from detr_lightning.speed import apply_speed_config

    untouched = apply_speed_config(build_detr(**TINY), None)  # no group: every option off
    assert torch.nn.Dropout in {type(m) for m in untouched.modules()}
    defaults = OmegaConf.load(REPO_ROOT / "conf" / "speed" / "default.yaml")
    defaults.reuse_freed_memory = False  # process-wide: not in the test process
    swapped = apply_speed_config(build_detr(**TINY), defaults)
    assert FastDropout in {type(m) for m in swapped.modules()}  # on by default


def test_fast_dropout_option_swaps_the_dropout_modules():
    model = apply_speed_options(build_detr(**TINY), fast_dropout=True)
    kinds = {type(m) for m in model.modules()}
    assert FastDropout in kinds and FastDropoutMultiheadAttention in kinds
    assert torch.nn.Dropout not in kinds and torch.nn.MultiheadAttention not in kinds


FAULTS_OF_FREED_TENSORS = """
import resource, statistics, sys, torch
from detr_lightning.speed import reuse_freed_host_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_host_memory()
faults = []
for _ in range(16):  # 64 MB tensors, each freed at once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 1024 * 1024)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(statistics.median(faults[8:]))  # the heap settles within the first few
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_reuse_freed_memory_keeps_freed_blocks_in_the_heap():
    """With the option a freed 64 MB tensor's memory is reused (after the heap has settled, within the
    first few allocations); without it each new tensor is a fresh mmap, faulted in page by page
    (16384 faults of 4 KiB pages). In subprocesses: the option is process-wide."""

    def median_page_faults(mode: str) -> float:
        result = subprocess.run(
            [sys.executable, "-c", FAULTS_OF_FREED_TENSORS, mode], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr[-2000:]
        return float(result.stdout.split()[-1])

    assert median_page_faults("default") > 8000
    assert median_page_faults("reuse") < 1000


def test_unknown_compile_mode_is_refused():
    with pytest.raises(ValueError, match="compile_mode"):
        apply_speed_options(build_detr(**TINY), compile=True, compile_mode="fastest")


def test_synthetic_detections_are_valid_xywh():
    predictions, targets = synthetic_detections(5, 10)
    assert len(predictions) == len(targets) == 5
    for prediction, target in zip(predictions, targets, strict=True):
        assert prediction["boxes"].shape == (10, 4) and prediction["scores"].shape == (10,)
        assert (prediction["boxes"][:, 2:] > 0).all() and (target["boxes"][:, 2:] > 0).all()


def run_bench(*args: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "detr_lightning.bench", *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])  # the JSON line is always last


def test_metric_benchmark_backends_agree():
    figures = run_bench("metric", "--images", "30", "--detections", "20")
    assert figures["benchmark"] == "metric"
    assert figures["max_abs_difference"] == 0.0
    assert 0 < figures["map"] < 1
    assert figures["faster_coco_eval_s"] > 0 and figures["pycocotools_s"] > 0
    assert {"cpu", "cpu_cores", "torch"} <= set(figures)


def test_data_benchmark_reports_images_per_second():
    figures = run_bench("data", "--images", "6", "--workers", "0")
    assert figures["workers0_images_per_s"] > 0


def test_train_step_benchmark_runs_one_step_with_breakdown():
    figures = run_bench(
        "train-step",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--device",
        "cpu",
        "--breakdown",
        "--no-flops",
        "--fast-dropout",
        "--reuse-freed-memory",
    )
    assert figures["impl"] == "ours" and figures["steps"] == 1
    assert figures["fast_dropout"] is True
    assert figures["reuse_freed_memory"] is (platform.libc_ver()[0] == "glibc")
    assert figures["median_s"] > 0 and figures["peak_memory_mib"] > 0
    for phase in ("forward", "loss", "backward", "optimizer"):
        assert figures[f"{phase}_median_s"] > 0
