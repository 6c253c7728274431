"""Probe DETR's early plateau on the demo data: train N steps, print how much the boxes depend on the image.

    python experiments/convergence/plateau_probe.py [HYDRA OVERRIDES ...]

Every 50 steps it prints the running means of the matched losses (``loss_bbox``, ``loss_giou``: summed
over query groups when ``model.num_groups > 1``), ``class_error``, and two spreads of the last decoder
layer's predicted boxes ``(B, Q, 4)``: ``query_spread`` (std over the queries of one image) and
``image_spread`` (std over the images for one query). A model on the plateau gives every query its own
fixed box whatever the image: ``query_spread`` grows, ``image_spread`` stays near 0.

Environment switches (experiments, not product options):

- ``STEPS`` (600), ``THREADS`` (1);
- ``NO_AUGMENT=1``: train on the train split with the evaluation resize (no flip, crop or multi-scale);
- ``MEMORY_WITH_POSITION=1``: add the position encoding to the encoder input, so the decoder's values
  carry position;
- ``POSITION_SCALE=s`` / ``QUERY_SCALE=s``: multiply the position encoding / the query embeddings in
  the attention (sharper positional attention at the start).
"""

import os
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from detr_lightning.config import register_configs  # noqa: E402
from detr_lightning.data.transforms import DetectionTransform, make_eval_geometry  # noqa: E402
from detr_lightning.models import transformer as transformer_module  # noqa: E402
from detr_lightning.training import build_module  # noqa: E402


def patch_transformer() -> None:
    """Apply the experimental switches to ``Transformer.forward``."""
    position_scale = float(os.environ.get("POSITION_SCALE", "1"))
    query_scale = float(os.environ.get("QUERY_SCALE", "1"))
    with_position = os.environ.get("MEMORY_WITH_POSITION") == "1"
    original = transformer_module.Transformer.forward

    def forward(self, src, mask, query_embed, pos_embed, self_attn_mask=None, cross_attn_bias=None):
        if with_position:
            src = src + pos_embed
        query_embed, pos_embed = query_embed * query_scale, pos_embed * position_scale
        return original(self, src, mask, query_embed, pos_embed, self_attn_mask, cross_attn_bias)

    transformer_module.Transformer.forward = forward


def main() -> None:
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    steps = int(os.environ.get("STEPS", "600"))
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=sys.argv[1:], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    torch.manual_seed(cfg.seed)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    if os.environ.get("NO_AUGMENT") == "1":
        geometry = make_eval_geometry(cfg.data.val_scale, cfg.data.val_max_size)
        datamodule.dataset("train").transform = DetectionTransform(geometry)
    num_classes = cfg.model.num_classes or datamodule.num_classes
    module = build_module(cfg, num_classes)
    patch_transformer()
    optimizer = module.configure_optimizers()["optimizer"]
    clip = float(cfg.trainer.get("gradient_clip_val") or 0.0)
    module.train()
    step, started, running = 0, time.time(), {}
    while step < steps:
        for images, mask, targets in datamodule.train_dataloader():
            outputs = module.model(images, mask)
            losses = module.criterion(outputs, targets)
            optimizer.zero_grad()
            module.criterion.weighted_total(losses).backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
            optimizer.step()
            step += 1
            boxes = outputs["pred_boxes"].detach()  # (B, Q, 4)
            figures = {k: float(losses[k].detach()) for k in ("loss_bbox", "loss_giou", "class_error")}
            figures["query_spread"] = float(boxes.std(dim=1).mean())
            figures["image_spread"] = float(boxes.std(dim=0).mean())
            for key, value in figures.items():
                running.setdefault(key, []).append(value)
            if step % 50 == 0:
                means = " ".join(f"{k}={sum(v) / len(v):.3f}" for k, v in running.items())
                print(f"step {step} {means} ({time.time() - started:.0f} s)", flush=True)
                running = {}
            if step >= steps:
                break


if __name__ == "__main__":
    main()
