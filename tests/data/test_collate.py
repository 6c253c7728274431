from __future__ import annotations

import torch

from detr_lightning.data.collate import Batch, collate_detection


def test_collate_pads_bottom_right_and_masks_the_padding() -> None:
    first, second = torch.rand(3, 4, 6), torch.rand(3, 5, 3)
    targets = [{"image_id": torch.tensor(7)}, {"image_id": torch.tensor(9)}]
    batch = collate_detection([(first, targets[0]), (second, targets[1])])
    assert isinstance(batch, Batch)
    assert (
        batch.images.shape == (2, 3, 5, 6)
        and batch.mask.shape == (2, 5, 6)
        and batch.mask.dtype == torch.bool
    )
    assert torch.equal(batch.images[0, :, :4, :6], first) and torch.equal(batch.images[1, :, :5, :3], second)
    assert batch.images[0, :, 4:].abs().sum() == 0 and batch.images[1, :, :, 3:].abs().sum() == 0
    expected_first = torch.ones(5, 6, dtype=torch.bool)
    expected_first[:4, :6] = False
    expected_second = torch.ones(5, 6, dtype=torch.bool)
    expected_second[:5, :3] = False
    assert torch.equal(batch.mask[0], expected_first) and torch.equal(batch.mask[1], expected_second)
    assert [t["image_id"].item() for t in batch.targets] == [7, 9]
    images, mask, unpacked_targets = batch  # a NamedTuple unpacks like a tuple
    assert images is batch.images and unpacked_targets == batch.targets
