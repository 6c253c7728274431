"""Shape buckets (``data.pad_to_multiple``): batches padded up to a bounded set of sizes, masked as DETR's
padding already is; off by default (the official padding to the largest image, unchanged)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torchvision import tv_tensors

from detr_lightning.batching import pad_images_to_batch, padded_size
from detr_lightning.data.collate import collate_detection
from detr_lightning.data.datamodule import CocoDataModule
from detr_lightning.data.errors import DataError
from detr_lightning.models import PostProcess, build_detr
from tiny_detr import tiny_detr_kwargs

#: The demo's own transform sizes (conf/data/demo.yaml).
DEMO_SCALES = {
    key: value
    for key, value in OmegaConf.to_container(
        OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / "data" / "demo.yaml")
    ).items()
    if key.startswith(("train_", "val_"))
}


def test_padded_size_rounds_up_to_the_multiple():
    assert padded_size(800, 1066, 128) == (896, 1152)
    assert padded_size(896, 1152, 128) == (896, 1152)  # already a bucket: unchanged
    assert padded_size(801, 1, 32) == (832, 32)
    assert padded_size(801, 1066, None) == (801, 1066)
    with pytest.raises(ValueError, match="positive"):
        padded_size(10, 10, 0)


def test_bucketed_batch_is_the_official_batch_with_more_masked_padding():
    images = [torch.randn(3, 70, 100), torch.randn(3, 90, 60)]
    official, official_mask = pad_images_to_batch(images)
    bucketed, mask = pad_images_to_batch(images, size_multiple=64)
    assert official.shape == (2, 3, 90, 100) and bucketed.shape == (2, 3, 128, 128)
    assert torch.equal(bucketed[..., :90, :100], official)
    assert torch.equal(mask[:, :90, :100], official_mask)
    assert bucketed[..., 90:, :].abs().sum() == 0 and bucketed[..., :, 100:].abs().sum() == 0
    assert mask[:, 90:, :].all() and mask[:, :, 100:].all()
    assert collate_detection([(images[0], {}), (images[1], {})], pad_to_multiple=64).images.shape[-2:] == (
        128,
        128,
    )


def _detect(model: torch.nn.Module, images: list[torch.Tensor], multiple: int | None) -> dict:
    batch, mask = pad_images_to_batch(images, size_multiple=multiple)
    with torch.no_grad():
        outputs = model(batch, mask)
    sizes = torch.tensor([list(image.shape[-2:]) for image in images])
    return {**outputs, "detections": PostProcess()(outputs, sizes)}


def test_a_bucket_gives_an_image_exactly_what_a_larger_batch_partner_gives():
    """Bucket padding is DETR's padding: an image padded to its bucket gets the same outputs as when a
    batch partner of the bucket's size makes the batch that large (the official code's case)."""
    torch.manual_seed(0)
    model = build_detr(**tiny_detr_kwargs(dropout=0.0)).eval()
    image = torch.randn(3, 90, 75)
    alone = _detect(model, [image], multiple=128)
    height, width = padded_size(90, 75, 128)
    with_partner = _detect(model, [image, torch.randn(3, height, width)], multiple=None)
    torch.testing.assert_close(alone["pred_logits"][0], with_partner["pred_logits"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone["pred_boxes"][0], with_partner["pred_boxes"][0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_bucketed_detections_match_the_unbucketed_ones_within_the_stated_tolerance(seed):
    """Tiny random DETR in eval mode, 3 images, buckets of 128 against the official padding.

    Not bit-identical: the backbone's convolutions near each image's bottom/right edge see the extra
    padding rows as activations (beyond the official batch's edge they see the convolutions' own zero
    padding), and the mask is sampled at other pixels when the official size is not a multiple of 32.
    The transformer masks every padded position and the sine positions are normalised by each image's
    unpadded extent, so nothing else changes. Measured over seeds 0-19: class probabilities differ by at
    most 0.079 (median 0.015), normalised boxes by at most 0.012 (median 0.0027), 1.5 px at most in
    detection boxes; the tolerances below are 0.1 and 0.02. A trained model need not be as sensitive: an
    untrained one's class scores are near-ties (7 of 360 top labels flipped over the 20 seeds).
    """
    torch.manual_seed(seed)
    model = build_detr(**tiny_detr_kwargs(dropout=0.0)).eval()
    images = [torch.randn(3, 100, 130), torch.randn(3, 90, 75), torch.randn(3, 120, 97)]
    official, bucketed = _detect(model, images, None), _detect(model, images, 128)
    probabilities = (official["pred_logits"].softmax(-1) - bucketed["pred_logits"].softmax(-1)).abs()
    assert probabilities.max() <= 0.1
    assert (official["pred_boxes"] - bucketed["pred_boxes"]).abs().max() <= 0.02
    for expected, actual in zip(official["detections"], bucketed["detections"], strict=True):
        assert (expected["scores"] - actual["scores"]).abs().max() <= 0.1
        assert (expected["boxes"] - actual["boxes"]).abs().max() <= 0.02 * 130  # pixels of the largest side


def _epoch_of_batch_shapes(multiple: int | None, batches: int, batch_size: int) -> set[tuple[int, int]]:
    """Padded batch shapes of ``batches`` batches of the official training geometry (scales 480-800,
    max 1333, random crops) on COCO-like images (sides 640-1024 px), read from the boxes' canvas."""
    geometry = CocoDataModule().train_transform.geometry  # the official defaults, as data=coco
    torch.manual_seed(0)
    sides = random.Random(0)
    shapes = set()
    for _ in range(batches):
        sizes = []
        for _ in range(batch_size):
            canvas = (sides.randint(640, 1024), sides.randint(640, 1024))
            box = tv_tensors.BoundingBoxes(
                torch.tensor([[0.0, 0.0, 9.0, 9.0]]), format="XYXY", canvas_size=canvas
            )
            sizes.append(geometry(box).canvas_size)
        shapes.add(padded_size(max(h for h, _ in sizes), max(w for _, w in sizes), multiple))
    return shapes


def test_buckets_bound_the_batch_shapes_of_an_epoch_of_the_official_multi_scale_recipe():
    """1000 batches of 2: 929 distinct shapes without buckets; with multiples of 32, 64 and 128: 225, 80 and
    28 (27 at batch 4). Multiples of 128 can give at most 64: heights and widths in 512..1408 (the longer
    side is at most 1333, the shorter at least 480)."""
    official = _epoch_of_batch_shapes(None, batches=1000, batch_size=2)
    bucketed = _epoch_of_batch_shapes(128, batches=1000, batch_size=2)
    assert all(h % 128 == 0 and w % 128 == 0 for h, w in bucketed)
    assert all(512 <= side <= 1408 for shape in bucketed for side in shape)
    assert len(bucketed) <= 64 and len(official) > 10 * len(bucketed)


def test_loaders_pad_to_buckets_and_default_to_the_official_padding(small_demo: Path):
    def module(**options) -> CocoDataModule:
        datamodule = CocoDataModule(small_demo, batch_size=4, num_workers=0, **DEMO_SCALES, **options)
        datamodule.setup("fit")
        return datamodule

    official, bucketed = module(), module(pad_to_multiple=64)
    assert official.train_dataloader().collate_fn is collate_detection  # default: unchanged
    pairs = list(zip(official.train_dataloader(), bucketed.train_dataloader(), strict=True))
    pairs += list(zip(official.val_dataloader(), bucketed.val_dataloader(), strict=True))
    for expected, actual in pairs:  # same seed: the same augmentation, only the padding differs
        height, width = expected.images.shape[-2:]
        assert actual.images.shape[-2:] == padded_size(height, width, 64)
        assert torch.equal(actual.images[..., :height, :width], expected.images)
        assert torch.equal(actual.mask[:, :height, :width], expected.mask)
        assert actual.mask[:, height:].all() and actual.mask[:, :, width:].all()
    with pytest.raises(DataError, match="pad_to_multiple"):
        CocoDataModule(small_demo, pad_to_multiple=0)
