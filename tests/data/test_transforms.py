from __future__ import annotations

from typing import Any

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from detr_lightning.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DetectionTransform,
    RandomShortSideResize,
    RandomSizeCrop,
    make_eval_geometry,
    make_train_geometry,
    short_side_resize_shape,
)

RED, BLUE = (230, 20, 20), (20, 20, 230)


def _target(boxes: list[list[float]], labels: list[int]) -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "iscrowd": torch.zeros(len(labels), dtype=torch.int64),
    }


def _xyxy(target: dict[str, torch.Tensor]) -> torch.Tensor:
    """Back from normalised cxcywh to absolute xyxy pixels of the transformed image."""
    height, width = target["size"].tolist()
    cx, cy, w, h = (target["boxes"] * torch.tensor([width, height, width, height])).unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


@pytest.mark.parametrize(
    ("height", "width", "size", "max_size", "expected"),
    [
        (480, 640, 800, 1333, (800, 1066)),  # the official example
        (640, 480, 800, 1333, (1066, 800)),
        (100, 400, 800, 1333, (333, 1332)),  # longer side capped: size becomes round(1333 * 100 / 400)
        (800, 1000, 800, 1333, (800, 1000)),  # already there
        (30, 40, 15, None, (15, 20)),
    ],
)
def test_short_side_resize_shape_matches_the_official_rule(height, width, size, max_size, expected) -> None:
    assert short_side_resize_shape(height, width, size, max_size) == expected


def test_flip_mirrors_boxes() -> None:
    image = torch.zeros(3, 30, 40, dtype=torch.uint8)
    _, target = DetectionTransform(v2.RandomHorizontalFlip(p=1.0))(image, _target([[2, 3, 12, 11]], [1]))
    torch.testing.assert_close(_xyxy(target), torch.tensor([[28.0, 3.0, 38.0, 11.0]]))
    torch.testing.assert_close(target["boxes"], torch.tensor([[33 / 40, 7 / 30, 10 / 40, 8 / 30]]))


def test_resize_scales_boxes_and_reports_the_new_size() -> None:
    image = torch.zeros(3, 30, 40, dtype=torch.uint8)
    transformed, target = DetectionTransform(RandomShortSideResize([15]))(
        image, _target([[2, 3, 12, 11]], [1])
    )
    assert transformed.shape == (3, 15, 20)
    assert target["size"].tolist() == [15, 20]
    torch.testing.assert_close(_xyxy(target), torch.tensor([[1.0, 1.5, 6.0, 5.5]]))
    torch.testing.assert_close(target["area"], torch.tensor([5.0 * 4.0]))


class _FixedCrop(RandomSizeCrop):
    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"top": 5, "left": 10, "height": 20, "width": 25}


def test_crop_shifts_cuts_and_drops_boxes() -> None:
    image = torch.arange(30 * 40, dtype=torch.int64).reshape(1, 30, 40).expand(3, 30, 40).to(torch.uint8)
    boxes = [[2, 3, 12, 11], [20, 10, 35, 22], [36, 26, 39, 29]]
    transformed, target = DetectionTransform(_FixedCrop(1, 100))(image, _target(boxes, [1, 2, 3]))
    assert transformed.shape == (3, 20, 25) and target["size"].tolist() == [20, 25]
    # [2,3,12,11] - (10,5) = [-8,-2,2,6] -> cut to [0,0,2,6]; the third box falls outside and is dropped.
    torch.testing.assert_close(_xyxy(target), torch.tensor([[0.0, 0.0, 2.0, 6.0], [10.0, 5.0, 25.0, 17.0]]))
    assert target["labels"].tolist() == [1, 2]
    assert target["iscrowd"].tolist() == [0, 0]
    torch.testing.assert_close(target["area"], torch.tensor([12.0, 180.0]))
    expected_pixels = image[:, 5:25, 10:35].float() / 255
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(transformed, (expected_pixels - mean) / std)


def test_random_crop_sizes_stay_in_range() -> None:
    crop = RandomSizeCrop(384, 600)
    torch.manual_seed(0)
    for _ in range(50):
        params = crop.make_params([tv_tensors.Image(torch.zeros(3, 500, 700, dtype=torch.uint8))])
        assert 384 <= params["width"] <= 600 and 384 <= params["height"] <= 500
        assert 0 <= params["top"] <= 500 - params["height"] and 0 <= params["left"] <= 700 - params["width"]
    small = crop.make_params([tv_tensors.Image(torch.zeros(3, 100, 120, dtype=torch.uint8))])
    assert (small["height"], small["width"]) == (100, 120)  # smaller than min_size: the whole image


def _scene() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A grey 90x120 image with a red box (label 0) and a blue box (label 1)."""
    image = torch.full((3, 90, 120), 128, dtype=torch.uint8)
    image[:, 10:50, 15:45] = torch.tensor(RED, dtype=torch.uint8)[:, None, None]
    image[:, 40:80, 70:110] = torch.tensor(BLUE, dtype=torch.uint8)[:, None, None]
    return image, _target([[15, 10, 45, 50], [70, 40, 110, 80]], [0, 1])


def test_training_augmentation_keeps_boxes_on_their_objects() -> None:
    transform = DetectionTransform(make_train_geometry([48, 64, 80], 160, [60, 72], (40, 60)))
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    colours = {0: torch.tensor(RED) / 255, 1: torch.tensor(BLUE) / 255}
    seen_sizes, checked_boxes = set(), 0
    for seed in range(40):
        torch.manual_seed(seed)
        normalized, target = transform(*_scene())
        pixels = normalized * std + mean
        seen_sizes.add(tuple(target["size"].tolist()))
        assert target["boxes"].min() >= 0 and target["boxes"].max() <= 1
        for box, label in zip(_xyxy(target), target["labels"].tolist(), strict=True):
            x0, y0, x1, y1 = box.tolist()
            if min(x1 - x0, y1 - y0) < 4:  # a sliver left by the crop: too thin to sample its inside
                continue
            inside = pixels[:, round(y0) + 1 : round(y1) - 1, round(x0) + 1 : round(x1) - 1]
            torch.testing.assert_close(inside.mean(dim=(1, 2)), colours[label], atol=0.05, rtol=0)
            checked_boxes += 1
    assert checked_boxes > 50
    assert len(seen_sizes) > 3  # multi-scale and crops really vary the size


def test_evaluation_transform_is_deterministic() -> None:
    transform = DetectionTransform(make_eval_geometry(60, 100))
    first_image, first_target = transform(*_scene())
    second_image, second_target = transform(*_scene())
    assert first_image.shape == (3, 60, 80)
    assert torch.equal(first_image, second_image) and torch.equal(
        first_target["boxes"], second_target["boxes"]
    )
    torch.testing.assert_close(
        _xyxy(first_target),
        torch.tensor([[10.0, 20 / 3, 30.0, 100 / 3], [140 / 3, 80 / 3, 220 / 3, 160 / 3]]),
    )
