"""Bad inputs: every case of the data check list, wrong config keys and types, num_classes, batch size,
odd images, unwritable or full output folders. Each fails before the first training step with one
message naming the file, the record and the fix (no stack trace), or trains with a clear warning."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf, open_dict

from cli_runs import run_script
from data.builders import CATEGORIES, coco_dict, write_image, write_split
from data.test_check import BROKEN_DATASETS
from detr_lightning import preflight
from detr_lightning.config import ConfigError
from detr_lightning.evaluation import evaluate
from detr_lightning.lit_module import DETRLitModule
from detr_lightning.preflight import OutputDirError, check_output_dirs
from detr_lightning.training import exit_on_user_error, train

from .conftest import REPO_ROOT, cli_env, demo_args, fast, load_checkpoint

pytestmark = pytest.mark.slow

SPLIT_FOLDERS = ("train", "valid", "test")


def roboflow_dataset(root: Path) -> Path:
    """The valid three-image set of tests/data in every split of a Roboflow export."""
    for folder in SPLIT_FOLDERS:
        write_split(root / folder / "_annotations.coco.json", root / folder)
    return root


def run_train_py(args: list[str], cwd: Path, timeout: float = 240):
    """conftest's ``run_cli(args, cwd=cwd, timeout=timeout)``: ``python train.py ARGS`` with :func:`cli_env`,
    here as a fork of the preloaded server of :mod:`cli_runs`."""
    return run_script(REPO_ROOT / "train.py", args, cwd=cwd, env=cli_env(), timeout=timeout)


@pytest.fixture
def dataset(tmp_path) -> Path:
    return roboflow_dataset(tmp_path / "dataset")


@pytest.fixture
def train_in_process(compose_config, tmp_path, monkeypatch):
    """``train_in_process(root, overrides)``: what ``python train.py`` does, in this process.

    Returns the ``error: ...`` message it exits with, or the metrics. Any training step fails the test
    unless ``steps_allowed``: the errors must come before the first one.
    """

    def run(root: Path, overrides: list[str] = (), steps_allowed: bool = False):
        cfg = compose_config(
            [
                "experiment=demo",
                f"data.root={root}",
                f"paths.root_dir={tmp_path}",
                f"paths.output_dir={tmp_path / 'run'}",
                *fast(*overrides),
            ]
        )
        with open_dict(cfg):
            del cfg["hydra"]
        if not steps_allowed:
            monkeypatch.setattr(DETRLitModule, "training_step", _no_step)
        try:
            with exit_on_user_error():
                return train(cfg)
        except SystemExit as stop:
            return str(stop.code)

    return run


def _no_step(*args, **kwargs):
    raise AssertionError("a training step ran before the error")


def _one_message(message: str, expected: str) -> None:
    assert message.startswith("error: ") and "\n" not in message, message
    assert re.search(expected, message), message
    assert "Fix:" in message or "Fix " in message, message


def _as_overrides(check_args: list[str]) -> list[str]:
    """``data.check`` CLI flags (``--train-ann-file X``) as train.py overrides."""
    pairs = zip(check_args[::2], check_args[1::2], strict=True)
    return [
        f"data.{flag[2:].replace('-ann-file', '.ann_file').replace('-img-dir', '.img_dir')}={value}"
        for flag, value in pairs
    ]


@pytest.mark.parametrize("case", list(BROKEN_DATASETS))
def test_every_data_check_case_stops_train_before_the_first_step(dataset, train_in_process, case):
    breaker, expected = BROKEN_DATASETS[case]
    overrides = _as_overrides(breaker(dataset))
    _one_message(train_in_process(dataset, overrides), expected)


def _edit(ann_file: Path, edit) -> None:
    data = json.loads(ann_file.read_text())
    edit(data)
    ann_file.write_text(json.dumps(data))


def _text_file_record(root: Path) -> list[str]:
    (root / "train" / "notes.txt").write_text("not an image")
    _edit(root / "train" / "_annotations.coco.json", lambda d: d["images"][0].update(file_name="notes.txt"))
    return []


MORE_CASES = {
    "record pointing at a text file": (
        _text_file_record,
        r"cannot be decoded: \S*train/notes\.txt \(image id 1\): UnidentifiedImageError",
    ),
    "num_classes smaller than the data needs": (
        lambda root: ["model.num_classes=2"],
        r"model\.num_classes=2 cannot hold the data's labels: the largest label is 3 \('dog'.*at least 4",
    ),
    "batch larger than the dataset (drop_last)": (
        lambda root: ["data.batch_size=8"],
        r"the train split has 3 images \(3 per process\), fewer than data\.batch_size=8.*drop_last=false",
    ),
    "not positive: model.num_queries=0": (
        lambda root: ["model.num_queries=0"],
        r"config: model\.num_queries=0 must be positive",
    ),
    "not positive: speed.compile_recompile_limit=0": (
        lambda root: ["speed.compile_recompile_limit=0"],
        r"config: speed\.compile_recompile_limit=0 must be positive",
    ),
    "negative: optimizer.lr=-1": (
        lambda root: ["optimizer.lr=-1"],
        r"config: optimizer\.lr=-1\.0 must be 0 or more",
    ),
    "heads that do not divide the width": (
        lambda root: ["model.nheads=3"],  # the demo's hidden_dim is 64
        r"config: model\.hidden_dim=64 must be even and a multiple of model\.nheads=3\. Fix: e\.g\. .*=66\.",
    ),
    "a model setting the model refuses (DC5 of a ResNet-18)": (
        lambda root: ["model.dilation=true"],
        r"config: model: backbone 'resnet18' has basic blocks, which torchvision cannot",
    ),
    "a trainer setting Lightning refuses (as trainer=gpu without a GPU)": (
        lambda root: ["trainer.devices=0"],
        r"config: trainer: `Trainer\(devices=0\)` value is not a valid .* Fix: change that trainer\.\* value",
    ),
}


@pytest.mark.parametrize("case", list(MORE_CASES))
def test_config_and_size_errors_stop_train_before_the_first_step(dataset, train_in_process, case):
    setup, expected = MORE_CASES[case]
    _one_message(train_in_process(dataset, setup(dataset)), expected)


def test_a_data_setting_refused_while_hydra_builds_the_data_module_is_one_message(dataset, train_in_process):
    message = train_in_process(dataset, ["data.batch_size=0"])  # raised inside hydra's instantiate
    assert message == "error: data.batch_size=0, data.val_batch_size=None: must be positive."


def test_a_wandb_setting_that_cannot_work_is_one_message(dataset, train_in_process, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "sometimes")  # raised inside hydra's instantiate, as a W&B error
    message = train_in_process(dataset, ["logger=wandb"])
    assert message.startswith("error: WANDB_MODE='sometimes' is not a W&B mode. Fix: unset it or use one of")


#: Wrong types and unknown choices: refused by the config schemas while Hydra composes (conf/ + config.py).
WRONG_VALUES = {
    "data.batch_size=abc": "Value 'abc' of type 'str' could not be converted to Integer",
    "optimizer.lr=fast": "Value 'fast' of type 'str' could not be converted to Float",
    "trainer.max_epochs=1.5": "Value '1.5' of type 'float' could not be converted to Integer",
    "loss.aux_loss=maybe": "Value 'maybe' is not a valid bool",
    "model.backbone=resnet99": (
        "Invalid value 'resnet99', expected one of [resnet18, resnet34, resnet50, resnet101]"
    ),
    "loss.class_loss=bce": "Invalid value 'bce', expected one of [ce, focal, varifocal]",
    # The official code lists GLU too, but cannot run it (it halves the FFN width linear2 expects).
    "model.activation=glu": "Invalid value 'glu', expected one of [relu, gelu]",
    "speed.compile_mode=fastest": (
        "Invalid value 'fastest', expected one of [default, reduce-overhead, max-autotune, "
        "max-autotune-no-cudagraphs]"
    ),
}


#: The same for the other commands: predict.py (PredictConfig) and export.py (ExportConfig, ExportSettings).
WRONG_COMMAND_VALUES = {
    "predict threshold=high": "Value 'high' of type 'str' could not be converted to Float",
    "predict batch_size=1.5": "Value '1.5' of type 'float' could not be converted to Integer",
    "predict attention_pixel=5": "int is not a ListConfig, list or tuple",
    "export format=tflite": "Invalid value 'tflite', expected one of [onnx, torchscript, huggingface]",
    "export onnx_exporter=fast": "Invalid value 'fast', expected one of [auto, dynamo, legacy]",
    "export height=abc": "Value 'abc' of type 'str' could not be converted to Integer",
    "export verify=maybe": "Value 'maybe' is not a valid bool",
}


@pytest.mark.parametrize(
    "case", [f"train {override}" for override in WRONG_VALUES] + list(WRONG_COMMAND_VALUES)
)
def test_wrong_types_and_choices_are_refused_when_composing(compose_config, case):
    command, override = case.split(" ")
    with pytest.raises(
        ConfigCompositionException, match=f"Error merging override {re.escape(override)}"
    ) as error:
        compose_config(["experiment=demo", override] if command == "train" else [override], command)
    reason = str(error.value.__cause__)
    expected = WRONG_VALUES[override] if command == "train" else WRONG_COMMAND_VALUES[case]
    assert expected in reason and f"full_key: {override.split('=')[0]}" in reason


def test_eval_checks_the_values_before_reading_anything(compose_config, tmp_path):
    cfg = compose_config([f"ckpt_path={tmp_path}/nowhere.ckpt", "postprocess.top_k=0"], "eval")
    with pytest.raises(ConfigError, match=r"config: postprocess\.top_k=0 must be positive"):
        evaluate(cfg)


def test_a_wrong_type_through_train_py_names_the_key_without_traceback(small_demo, tmp_path):
    result = run_train_py(
        demo_args(small_demo, tmp_path / "run", "data.batch_size=abc"), cwd=tmp_path, timeout=120
    )
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    assert result.stderr.splitlines()[0] == "Error merging override data.batch_size=abc", result.stderr
    assert "could not be converted to Integer" in result.stderr.splitlines()[1]


def test_unknown_config_key_is_refused_when_composing(compose_config):
    with pytest.raises(ConfigCompositionException, match="learning_rate"):
        compose_config(["experiment=demo", "optimizer.learning_rate=1"])


def test_batch_larger_than_the_dataset_trains_with_drop_last_false(dataset, train_in_process):
    metrics = train_in_process(dataset, ["data.batch_size=8", "data.drop_last=false"], steps_allowed=True)
    assert isinstance(metrics, dict) and np.isfinite(metrics["train/loss_epoch"]), metrics


# ---------------------------------------------------------------------------------------- through the CLI


def _assert_clean_failure(result, *expected: str) -> str:
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


def test_broken_dataset_through_train_py(dataset, tmp_path):
    _edit(dataset / "valid" / "_annotations.coco.json", lambda d: d["annotations"][1].update(category_id=7))
    run_dir = tmp_path / "run"
    result = run_train_py(demo_args(dataset, run_dir), cwd=tmp_path, timeout=120)
    _assert_clean_failure(
        result,
        str(dataset / "valid" / "_annotations.coco.json"),
        "annotation id 11 (image id 1) has category_id 7, which is not in 'categories'",
        "Fix: add the category or correct the annotation.",
    )
    assert not (run_dir / "checkpoints").exists()  # stopped before anything was trained or written


def test_unwritable_run_folder_through_train_py(small_demo, tmp_path):
    (tmp_path / "a_file").write_text("in the way")
    run_dir = tmp_path / "a_file" / "run"
    result = run_train_py(demo_args(small_demo, run_dir), cwd=tmp_path, timeout=120)
    _assert_clean_failure(result, f"output folder {run_dir} cannot be written (Not a directory)", "Fix:")


@pytest.mark.skipif(torch.cuda.device_count() > 0, reason="this machine has a GPU: gpu_pool would start jobs")
@pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is None,
    reason="the [cluster] extra (Hydra's Ray launcher) is not installed",
)
def test_gpu_pool_without_a_gpu_stops_at_once_through_train_py(small_demo, tmp_path):
    """The README's gpu_pool sweep on a CPU machine: one line naming local_pool, before Ray starts (which
    would wait for a GPU forever) and before any job folder exists."""
    sweep_dir = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=gpu_pool", f"hydra.sweep.dir={sweep_dir}", "loss.bbox_loss_coef=2,5"]
    result = run_train_py([*args, *demo_args(small_demo, tmp_path / "unused")], cwd=tmp_path, timeout=120)
    expected = ("ray.remote.num_gpus=1 GPU(s) per job", "Ray has 0,", "hydra/launcher=local_pool")
    _assert_clean_failure(result, *expected)
    assert "Ray Launcher" not in result.stdout + result.stderr
    assert not (sweep_dir / "0").exists()


@pytest.mark.parametrize(
    ("ray", "gpus_seen", "refused"),
    [
        ({"init": {"num_gpus": None}, "remote": {"num_gpus": 1}}, 0, True),  # gpu_pool, no GPU
        ({"init": {"num_gpus": None}, "remote": {"num_gpus": 1}}, 2, False),  # gpu_pool with GPUs
        ({"init": {"num_gpus": 1}, "remote": {"num_gpus": 2}}, 8, True),  # fewer declared than one job takes
        ({"init": {"num_gpus": 2}, "remote": {"num_gpus": 1}}, 0, False),  # declared (the launcher test)
        ({"init": {"num_gpus": 0}, "remote": {"num_gpus": 0}}, 0, False),  # local_pool
        ({"init": {"address": "ray://head:10001"}, "remote": {"num_gpus": 1}}, 0, False),  # a cluster
    ],
)
def test_ray_gpu_check_refuses_only_jobs_a_local_ray_can_never_start(monkeypatch, ray, gpus_seen, refused):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus_seen)
    launcher = {"_target_": "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher", "ray": ray}
    config = OmegaConf.create({"hydra": {"launcher": launcher}})
    if refused:
        with pytest.raises(SystemExit, match=r"^error: .*no job would ever start\. Fix: "):
            preflight.RayGpuCheck().on_multirun_start(config)
    else:
        preflight.RayGpuCheck().on_multirun_start(config)
    other_launcher = OmegaConf.create({"hydra": {"launcher": {"_target_": "hydra._internal.BasicLauncher"}}})
    preflight.RayGpuCheck().on_multirun_start(other_launcher)  # not Ray: nothing to check


# ------------------------------------------------------------------------------------ odd images, one run

Box = namedtuple("Box", "x y w h")


def _odd_split(folder: Path, image_ids: range) -> None:
    """A 40x30 image, a 1x1 image, a 10000x200 image and a 64x64 image with 300 boxes, plus files that
    are not images (and no records) in the image folder."""
    crowd = [Box(2 + 3 * (i % 20), 2 + 4 * (i // 20), 2, 3) for i in range(300)]
    specs = [
        ("a.jpg", 40, 30, [Box(2, 3, 10, 8), Box(20, 10, 15, 12)]),
        ("tiny.png", 1, 1, [Box(0, 0, 1, 1)]),
        ("wide.jpg", 10000, 200, [Box(100, 40, 2500, 120)]),
        ("crowded.png", 64, 64, crowd),
    ]
    images, annotations = [], []
    for image_id, (name, width, height, boxes) in zip(image_ids, specs, strict=False):
        write_image(folder / name, width, height, seed=image_id)
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        for index, box in enumerate(boxes):
            annotations.append(
                {
                    "id": 1000 * image_id + index,
                    "image_id": image_id,
                    "category_id": (1, 3)[index % 2],
                    "bbox": list(box),
                    "area": box.w * box.h,
                    "iscrowd": 0,
                }
            )
    (folder / "notes.txt").write_text("not an image")
    (folder / ".DS_Store").write_bytes(b"\x00\x01")
    (folder / "thumbnails").mkdir()
    (folder / "thumbnails" / "a.jpg").write_bytes(b"")
    data = coco_dict(images=images, annotations=annotations, categories=CATEGORIES)
    (folder / "_annotations.coco.json").write_text(json.dumps(data))


def test_odd_images_train_with_a_warning_for_more_boxes_than_queries(tmp_path):
    root = tmp_path / "odd"
    _odd_split(root / "train", range(1, 5))
    _odd_split(root / "valid", range(11, 15))
    run_dir = tmp_path / "run"
    result = run_train_py(
        demo_args(root, run_dir, "trainer.limit_val_batches=null", "trainer.max_epochs=1"), cwd=tmp_path
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Traceback" not in output and "Skipped step" not in output
    for split, image_id in (("train", 4), ("valid", 14)):
        assert (
            f"data: {root / split / '_annotations.coco.json'}: image id {image_id} has 300 boxes, more than "
            "model.num_queries=20" in output
        ), output[-3000:]
    assert "Fix: set model.num_queries=300 or more." in output
    last = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert last["epoch"] == 0 and last["global_step"] == 2  # 2 batches of 2, none skipped
    predictions = json.loads((run_dir / "predictions.coco.json").read_text())
    assert {p["image_id"] for p in predictions} == {11, 12, 13, 14}  # every odd image evaluated


# ---------------------------------------------------------------------------------------- output folders


def test_output_folder_problems_are_found_before_training(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("in the way")
    with pytest.raises(OutputDirError, match=r"a_file/checkpoints cannot be written \(Not a directory\)"):
        check_output_dirs([tmp_path / "run"], tmp_path / "a_file" / "checkpoints", checkpoint_size=1)

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: Usage(2**40, 2**40 - 2**20, 2**20))
    with pytest.raises(OutputDirError, match=r"has 1 MiB free, but training needs about 364 MiB") as full:
        check_output_dirs([tmp_path / "run"], tmp_path / "run" / "checkpoints", checkpoint_size=100 * 2**20)
    assert "Fix: free space there or point hydra.run.dir at a larger disk" in str(full.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders: chmod does not bite")
def test_read_only_output_folder_is_refused(tmp_path):
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        with pytest.raises(OutputDirError, match=r"read_only/run cannot be written \(Permission denied\)"):
            check_output_dirs([read_only / "run"], None, checkpoint_size=1)
    finally:
        read_only.chmod(0o755)
    assert shutil.disk_usage(tmp_path).free > 0
