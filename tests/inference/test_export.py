"""ONNX and TorchScript exports reproduce PyTorch, at the export size and (dynamic) at others."""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn.functional as F

from detr_lightning.config import ConfigError
from detr_lightning.export import (
    ExportableDETR,
    example_inputs,
    export,
    export_onnx,
    export_torchscript,
    nearest_mask,
)
from detr_lightning.inference import InferenceSettingError, load_detector

from .conftest import compose_config, finish_cli, start_cli, tiny_module

pytestmark = pytest.mark.slow

ATOL = 1e-4


@pytest.fixture(scope="module")
def model():
    return tiny_module(seed=1).model


@pytest.fixture(scope="module")
def fixed_size_export_command(training_run, tmp_path_factory):
    """``python export.py`` of a fixed-size ONNX model, as documented; the run's checkpoint gives the
    description's resize and names. Started before the first test, it runs in a process of its own (on
    the other core) while this one exports in-process, and `test_export_cli_fixed_size_onnx` awaits it.
    Yields the folder it writes and its (running) process."""
    output_dir = tmp_path_factory.mktemp("export_cli")
    args = [f"ckpt_path={training_run}", "dynamic=false", "batch_size=2", "height=64", "width=96"]
    process = start_cli("export.py", [*args, f"output_dir={output_dir}"], cwd=output_dir)
    yield output_dir, process
    if process.returncode is None:  # no test awaited it (deselected, or failed before)
        process.kill()
        process.communicate()


def reference(model, inputs):
    with torch.no_grad():
        return [t.numpy() for t in ExportableDETR(model).eval()(*inputs)]


def run_onnx(path, inputs):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {node.name: tensor.numpy() for node, tensor in zip(session.get_inputs(), inputs, strict=True)}
    return session.run(["pred_logits", "pred_boxes"], feeds)


def assert_parity(expected, actual):
    for ours, theirs in zip(expected, actual, strict=True):
        assert np.isfinite(theirs).all()
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(theirs, ours, atol=ATOL, rtol=0)


@pytest.mark.usefixtures("fixed_size_export_command")  # started first: it runs meanwhile
def test_onnx_dynamic_size_runs_other_sizes_and_batches(model, tmp_path):
    result = export_onnx(model, tmp_path / "dynamic.onnx", height=96, width=128, dynamic=True, verify=False)
    assert result.exporter == "torch.onnx.export(dynamo=True)"
    session = onnxruntime.InferenceSession(str(tmp_path / "dynamic.onnx"), providers=["CPUExecutionProvider"])
    assert [node.shape for node in session.get_inputs()] == [
        ["batch", 3, "height", "width"],
        ["batch", "height", "width"],
    ]
    # 2x79x90: the padded image's mask ends at column 60, which PyTorch's nearest down-sampling to 3
    # columns samples exactly (60 = 2 * 90 / 3) and ONNX Runtime's Resize would round to 59.
    for batch, height, width in [(1, 96, 128), (2, 79, 90), (3, 111, 150), (2, 200, 75)]:
        inputs = example_inputs(batch, height, width, seed=batch)
        assert_parity(reference(model, inputs), run_onnx(tmp_path / "dynamic.onnx", inputs))


def test_auto_falls_back_to_the_legacy_exporter_naming_the_failure_in_one_line(
    model, tmp_path, monkeypatch, caplog
):
    real_export = torch.onnx.export

    def dynamo_fails(*args, dynamo, **kwargs):
        if dynamo:  # as torch.onnx does: a page of advice wrapping the failure itself
            try:
                raise ValueError("Cannot view a tensor as that shape!\nWhile executing %view_46")
            except ValueError as failure:
                raise RuntimeError("Failed to decompose the FX graph.\nNext steps: ...") from failure
        return real_export(*args, dynamo=dynamo, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_fails)
    with pytest.raises(RuntimeError, match="Failed to decompose"):  # asked for dynamo: its error as it is
        export_onnx(model, tmp_path / "dynamo.onnx", exporter="dynamo", height=64, width=96, dynamic=False)
    with caplog.at_level(logging.WARNING, logger="detr_lightning.export"):
        result = export_onnx(model, tmp_path / "auto.onnx", height=64, width=96, dynamic=False, batch_size=2)
    assert result.exporter == "torch.onnx.export(dynamo=False)" and result.max_abs_diff
    assert [record.getMessage() for record in caplog.records if record.name == "detr_lightning.export"] == [
        "torch.onnx's dynamo exporter failed (ValueError: Cannot view a tensor as that shape!); using the "
        "legacy exporter."
    ]


def test_auto_takes_the_legacy_exporter_for_an_opset_below_18(model, tmp_path):
    # The dynamo exporter would keep opset 18 where it cannot convert down (ReLU, for one).
    path = tmp_path / "opset14.onnx"
    result = export_onnx(model, path, opset=14, height=64, width=96, dynamic=False, batch_size=2)
    assert result.exporter == "torch.onnx.export(dynamo=False)" and max(result.max_abs_diff.values()) < ATOL
    assert [o.version for o in onnx.load(path).opset_import if o.domain in ("", "ai.onnx")] == [14]


def test_nearest_mask_equals_interpolate():
    generator = torch.Generator().manual_seed(0)
    for in_size in [*range(1, 130), 533, 800, 1066, 1333]:
        mask = torch.rand(2, in_size, 7, generator=generator) > 0.5
        for out_size in {1, 2, 3, in_size // 32 + 1, in_size // 16 + 1, -(-in_size // 32)}:
            expected = F.interpolate(mask[None].float(), size=(out_size, 7)).to(torch.bool)[0]
            assert torch.equal(nearest_mask(mask, (out_size, 7)), expected), (in_size, out_size)


def test_torchscript_reloads_and_matches(model, tmp_path):
    export_torchscript(model, tmp_path / "model.pt", height=96, width=128, mask_input=False, verify=False)
    reloaded = torch.jit.load(str(tmp_path / "model.pt"))
    for batch, height, width in [(1, 96, 128), (2, 77, 140)]:
        (images,) = example_inputs(batch, height, width, mask_input=False, seed=batch)
        with torch.no_grad():
            actual = [t.numpy() for t in reloaded(images)]
        assert_parity(reference(model, (images,)), actual)


def test_export_cli_fixed_size_onnx(training_run, fixed_size_export_command):
    """The command as documented; the run's checkpoint gives the description's resize and names."""
    output_dir, process = fixed_size_export_command
    result = finish_cli(process)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((output_dir / "export.json").read_text())
    assert info["model_file"] == "model.onnx" and info["exporter"] == "torch.onnx.export(dynamo=True)"
    assert info["inputs"]["images"]["shape"] == [2, 3, 64, 96] and info["inputs"]["mask"]["shape"] == [
        2,
        64,
        96,
    ]
    assert info["preprocessing"]["resize"] == {"shorter_side": 96, "max_size": 160}
    assert info["class_names"]["4"] == "triangle" and info["outputs"]["pred_logits"]["shape"] == [2, 6, 6]
    assert list(info["max_abs_diff_to_pytorch"]) == ["2x64x96"]
    model = load_detector(ckpt_path=training_run).model
    inputs = example_inputs(2, 64, 96, seed=5)
    assert inputs[1][1].any() and not inputs[1][0].any()  # the second image is padded
    assert_parity(reference(model, inputs), run_onnx(output_dir / "model.onnx", inputs))
    with pytest.raises(Exception):  # noqa: B017 - a fixed-size graph rejects another size
        run_onnx(output_dir / "model.onnx", example_inputs(2, 64, 128))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        # Wrong types and choices (format=tflite) are refused while composing: test_bad_inputs.
        ("width=16", "height=800, width=16"),
        ("height=8", "height=8, width=1066"),
        ("atol=-1", r"config: atol=-1\.0 must be positive"),  # was a traceback from the check
        ("opset=13", r"config: opset=13: DETR's attention needs 14 or newer"),  # was the exporter's traceback
    ],
)
def test_export_settings_are_checked(training_run, tmp_path, override, message):
    cfg = compose_config("export", [f"ckpt_path={training_run}", f"output_dir={tmp_path}", override])
    with pytest.raises((InferenceSettingError, ConfigError), match=message):
        export(cfg)
