"""Fixtures for inference: a tiny model checkpoint inside a fake training run, and image files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig
from PIL import Image

from cli_runs import cli_env
from detr_lightning.lit_module import DETRLitModule
from tiny_detr import tiny_detr_kwargs

REPO_ROOT = Path(__file__).resolve().parents[2]

TINY_MODEL = tiny_detr_kwargs(num_classes=5, num_queries=6)
#: The demo dataset's categories: raw labels 0, 1, 2, 4 have names, label 3 has none.
CATEGORIES = [
    {"id": 0, "name": "shapes", "supercategory": "none"},
    {"id": 1, "name": "square", "supercategory": "shapes"},
    {"id": 2, "name": "disc", "supercategory": "shapes"},
    {"id": 4, "name": "triangle", "supercategory": "shapes"},
]
RUN_CONFIG = """\
paths:
  root_dir: ${hydra:runtime.cwd}
  data_dir: ${paths.root_dir}/data
  output_dir: ${hydra:runtime.output_dir}
data:
  _target_: detr_lightning.data.CocoDataModule
  root: ${paths.data_dir}/shapes
  label_mapping: raw
  train: {ann_file: null, img_dir: null}
  val: {ann_file: null, img_dir: null}
  test: {ann_file: null, img_dir: null}
  val_scale: 96
  val_max_size: 160
"""


def tiny_module(seed: int = 0) -> DETRLitModule:
    torch.manual_seed(seed)
    module = DETRLitModule(model=TINY_MODEL)
    with torch.no_grad():  # confident, varied class scores, so thresholds keep some detections
        module.model.class_embed.weight.mul_(20)
        module.model.class_embed.bias.copy_(torch.tensor([1.0, 2.0, 2.0, 1.0, 2.0, -4.0]))
    return module.eval()


def save_lightning_checkpoint(module: DETRLitModule, path: Path) -> Path:
    """A real Lightning checkpoint of ``module`` (hyper-parameters, architecture), without training."""
    trainer = lightning.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.strategy.connect(module)
    path.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def training_run(tmp_path_factory) -> Path:
    """``<tmp>/outputs/run/checkpoints/best.ckpt`` with the run's ``.hydra`` files; the run was started
    from ``<tmp>`` (``hydra.runtime.cwd``), whose ``data/shapes`` holds the annotation file."""
    workdir = tmp_path_factory.mktemp("training")
    annotations = {"images": [], "annotations": [], "categories": CATEGORIES}
    (workdir / "data" / "shapes" / "valid").mkdir(parents=True)
    (workdir / "data" / "shapes" / "valid" / "_annotations.coco.json").write_text(json.dumps(annotations))
    run = workdir / "outputs" / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(RUN_CONFIG)
    (run / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  runtime:\n    cwd: {workdir}\n")
    return save_lightning_checkpoint(tiny_module(), run / "checkpoints" / "best.ckpt")


#: name -> (width, height, PIL mode) of the generated inputs.
IMAGES = {"wide.png": (150, 90, "RGB"), "tall.jpg": (80, 130, "RGB"), "gray.png": (100, 100, "L")}


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory) -> Path:
    """A PNG, a JPEG and a grayscale PNG of different sizes, plus a text file."""
    folder = tmp_path_factory.mktemp("images")
    generator = torch.Generator().manual_seed(0)
    for name, (width, height, mode) in IMAGES.items():
        channels = 1 if mode == "L" else 3
        pixels = torch.randint(0, 256, (height, width, channels), dtype=torch.uint8, generator=generator)
        Image.fromarray(pixels.squeeze(-1).numpy()).save(folder / name)
    (folder / "notes.txt").write_text("not an image\n")
    return folder


def compose_config(name: str, overrides: list[str]) -> DictConfig:
    """The config ``conf/<name>.yaml`` with ``overrides``, as the entry point would compose it."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
            return compose(config_name=name, overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def start_cli(script: str, args: list[str], cwd: Path) -> subprocess.Popen:
    """``python SCRIPT ARGS`` from ``cwd``, offline, as a user would run it: started, not awaited
    (:func:`finish_cli` waits for it)."""
    return subprocess.Popen(
        [sys.executable, str(REPO_ROOT / script), *args],
        cwd=cwd,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish_cli(process: subprocess.Popen, timeout: float = 120) -> subprocess.CompletedProcess:
    """Wait for a :func:`start_cli` process, as ``subprocess.run(..., timeout=timeout)`` does: killed and
    ``TimeoutExpired`` past ``timeout`` seconds."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_cli(script: str, args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python SCRIPT ARGS`` from ``cwd``, offline, as a user would run it."""
    return finish_cli(start_cli(script, args, cwd), timeout)
