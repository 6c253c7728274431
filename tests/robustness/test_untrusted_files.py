"""Untrusted files: checkpoints that would run code are refused on every loading path, and image paths
from annotation files cannot leave the image folder (``..``, absolute paths, symbolic links)."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import lightning
import pytest
import torch

from cli_runs import run_script
from data.builders import coco_dict, write_image, write_split
from detr_lightning import load_detr
from detr_lightning.checkpoints import CheckpointError, read_project_checkpoint
from detr_lightning.data import CocoDataModule
from detr_lightning.data.check import load_split
from detr_lightning.data.errors import DataError
from detr_lightning.data.layout import SplitFiles
from detr_lightning.fault_tolerance import check_resume_checkpoint
from detr_lightning.inference import load_detector
from test_lit_module import loader, make_module, synthetic_batches

from .conftest import REPO_ROOT, cli_env, demo_args


class _RunsCode:
    """Unpickling this runs a shell command (what a malicious checkpoint does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def evil_checkpoint(tmp_path) -> tuple[Path, Path]:
    """A file shaped like a Lightning training checkpoint of this project, plus a code-running payload."""
    marker = tmp_path / "code-ran"
    module = make_module()
    checkpoint = {
        "epoch": 0,
        "global_step": 1,
        "state_dict": module.state_dict(),
        "optimizer_states": [],
        "lr_schedulers": [],
        "loops": {},
        "hyper_parameters": dict(module.hparams),
        "payload": _RunsCode(marker),
    }
    path = tmp_path / "last.ckpt"
    torch.save(checkpoint, path)
    return path, marker


def test_resuming_from_a_code_running_checkpoint_is_refused(small_demo, evil_checkpoint, tmp_path):
    path, marker = evil_checkpoint
    args = demo_args(small_demo, tmp_path / "run", f"ckpt_path={path}")
    # conftest's run_cli(args, cwd=tmp_path, timeout=120), as a fork of the preloaded server of cli_runs
    result = run_script(REPO_ROOT / "train.py", args, cwd=tmp_path, env=cli_env(), timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"Refusing to load {path}" in errors[0] and "could run code" in errors[0]
    assert "unsupported GLOBAL posix.system" in errors[0]  # the reason, quoted from the loader
    assert not marker.exists()


@pytest.mark.parametrize(
    "load",
    [
        pytest.param(check_resume_checkpoint, id="train.py ckpt_path (resume)"),
        pytest.param(read_project_checkpoint, id="eval.py ckpt_path"),
        pytest.param(lambda path: load_detector(ckpt_path=path), id="predict.py ckpt_path"),
        pytest.param(lambda path: load_detector(pretrained=str(path)), id="predict.py model.pretrained"),
        pytest.param(load_detr, id="model.pretrained (train, eval)"),
    ],
)
def test_every_loading_path_refuses_pickled_code(evil_checkpoint, load):
    path, marker = evil_checkpoint
    with pytest.raises(CheckpointError, match=f"Refusing to load {path}"):
        load(path)
    assert not marker.exists()


def test_lightning_itself_never_runs_the_code_either(evil_checkpoint, tmp_path):
    """Defence in depth: train.py also passes weights_only=True to Trainer.fit."""
    path, marker = evil_checkpoint
    trainer = lightning.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    with pytest.raises(pickle.UnpicklingError):
        trainer.fit(make_module(), loader(synthetic_batches(1)), ckpt_path=path, weights_only=True)
    assert not marker.exists()


def test_a_weights_file_is_not_a_training_state(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"model": make_module().model.state_dict()}, path)
    with pytest.raises(CheckpointError, match="not a Lightning training checkpoint .* model.pretrained=PATH"):
        check_resume_checkpoint(str(path))
    for ckpt_path in (read_project_checkpoint, lambda file: load_detector(ckpt_path=file)):  # eval, predict
        with pytest.raises(
            CheckpointError, match="not a Lightning checkpoint of this project.* model.pretrained="
        ):
            ckpt_path(path)


# ------------------------------------------------------------------------------------------- image paths


def _split(tmp_path: Path, file_name: str) -> SplitFiles:
    """A split whose image 2 has ``file_name``; the images folder is ``tmp_path/images``."""
    data = coco_dict()
    data["images"][1]["file_name"] = file_name
    ann_file = tmp_path / "ann.json"
    images = tmp_path / "images"
    for record in coco_dict()["images"]:
        write_image(images / record["file_name"], record["width"], record["height"])
    ann_file.write_text(json.dumps(data))
    return SplitFiles("train", ann_file, images)


@pytest.mark.parametrize(
    "file_name, expected",
    [
        (
            "../../etc/passwd",
            r"image id 2 has file_name '\.\./\.\./etc/passwd', which leaves the image folder",
        ),
        ("/etc/passwd", r"image id 2 has file_name '/etc/passwd', which leaves the image folder"),
        ("sub/../../b.png", r"which leaves the image folder"),
    ],
    ids=["dot-dot", "absolute", "dot-dot after a folder"],
)
def test_file_names_leaving_the_folder_are_refused_when_read(tmp_path, file_name, expected):
    with pytest.raises(DataError, match=expected) as error:
        load_split(_split(tmp_path, file_name))
    assert "Fix:" in str(error.value)


def _link_out(tmp_path: Path, how: str) -> str:
    """Make image 2 of the split a link out of the image folder; return its file_name."""
    outside = tmp_path / "outside"
    write_image(outside / "secret.png", 32, 32)
    images = tmp_path / "images"
    images.mkdir(parents=True, exist_ok=True)
    if how == "file":
        (images / "link.png").symlink_to(outside / "secret.png")
        return "link.png"
    (images / "linked_dir").symlink_to(outside, target_is_directory=True)
    return "linked_dir/secret.png"


@pytest.mark.parametrize("how", ["file", "folder"])
def test_symbolic_links_out_of_the_folder_are_refused_at_check_and_load_time(tmp_path, how):
    file_name = _link_out(tmp_path, how)
    split = load_split(_split(tmp_path, file_name))  # the annotation file itself is fine
    with pytest.raises(
        DataError, match=r"image path leaves the image folder: \S+ \(image id 2\) is a link to"
    ):
        split.verify_images()

    # With the image check switched off the dataset still refuses to read it.
    files = {"ann_file": str(split.files.ann_file), "img_dir": str(split.files.img_dir)}
    module = CocoDataModule(train=files, val=files, check_images=False, num_workers=0)
    module.setup("fit")
    dataset = module.dataset("train")
    with pytest.raises(DataError, match=r"is a link to \S+secret\.png, outside the image folder"):
        dataset[dataset.image_ids.index(2)]


def test_a_linked_image_folder_itself_is_fine(tmp_path):
    real = tmp_path / "real"
    ann_file = write_split(real / "ann.json", real)
    (tmp_path / "images").symlink_to(real, target_is_directory=True)
    split = load_split(SplitFiles("train", ann_file, tmp_path / "images"))
    split.verify_images()  # links that stay inside the (resolved) folder are allowed
