"""Two CPU processes (DDP, gloo) compute what one process computes on the same global batch.

The box losses are normalized by the number of boxes of *all* processes, so the mean over processes of
each process's box losses, and the DDP-averaged gradient, equal the single-process values on the global
batch even when the processes hold different numbers of objects. The validation side (same mAP on the
same checkpoint, every image evaluated once) is ``tests/training/test_train_cli.py::
test_ddp_evaluation_equals_single_process``.
"""

from __future__ import annotations

from pathlib import Path

import lightning
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from detr_lightning.batching import pad_images_to_batch
from detr_lightning.distributed import close_process_group
from detr_lightning.lit_module import DETRLitModule
from test_lit_module import TINY_MODEL

BOX_LOSSES = ("loss_bbox", "loss_giou", "loss_bbox_0", "loss_giou_0")


def _image_and_target(image_id: int, boxes: list[list[float]], nan: bool = False):
    generator = torch.Generator().manual_seed(image_id)
    target = {
        "labels": torch.arange(len(boxes)) % 3,
        "boxes": torch.tensor(boxes) * (float("nan") if nan else 1.0),
        "image_id": torch.tensor(image_id),
        "orig_size": torch.tensor([64, 64]),
    }
    return torch.randn(3, 64, 64, generator=generator), target  # one size: no padding differences


A = (1, [[0.3, 0.3, 0.2, 0.2]])  # one object
B = (2, [[0.6, 0.6, 0.3, 0.2], [0.5, 0.5, 0.4, 0.4], [0.2, 0.7, 0.1, 0.2]])  # three objects


def _batch(*samples):
    images, targets = zip(*samples, strict=True)
    padded, mask = pad_images_to_batch(list(images))
    return padded, mask, list(targets)


def _identity(batch):
    return batch


class _Batches(lightning.LightningDataModule):
    """Ready-made batches; rank ``r`` of ``R`` gets batches ``r, r + R, ...`` (no shuffling)."""

    def __init__(self, batches) -> None:
        super().__init__()
        self.batches = batches

    def train_dataloader(self) -> DataLoader:
        ranks = dict(num_replicas=self.trainer.world_size, rank=self.trainer.global_rank)
        sampler = DistributedSampler(self.batches, shuffle=False, **ranks)
        return DataLoader(self.batches, batch_size=None, sampler=sampler, collate_fn=_identity)


def _module() -> DETRLitModule:
    torch.manual_seed(0)
    return DETRLitModule(
        model={**TINY_MODEL, "dropout": 0.0},
        # Classification is a per-process mean as in the official code (its no-object weighting does not
        # split exactly across processes): left out here so the gradients isolate the box losses.
        loss={"ce_loss_coef": 0.0, "bbox_loss_coef": 5, "giou_loss_coef": 2, "eos_coef": 0.1},
        optimizer={"lr": 1e-4, "lr_backbone": 1e-5, "weight_decay": 1e-4},
    )


class _Record(lightning.Callback):
    """Per rank: the first step's gradients and logged losses, the skip count, a weight checksum."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.record = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 0:
            self.record["grads"] = {
                n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None
            }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0:
            metrics = trainer.callback_metrics
            self.record["losses"] = {k: float(metrics[f"train/{k}_step"]) for k in BOX_LOSSES}

    def on_train_end(self, trainer, pl_module):
        self.record["skipped"] = pl_module.skipped_steps
        self.record["weights"] = {k: v.clone() for k, v in pl_module.state_dict().items()}
        torch.save(self.record, self.out / f"rank{trainer.global_rank}_of_{trainer.world_size}.pt")


def _fit(tmp_path: Path, batches, devices: int) -> None:
    trainer = lightning.Trainer(
        accelerator="cpu",
        devices=devices,
        # Fresh processes, not forks of this one: a fork cannot run autograd once this process has run
        # autograd's device threads (an ONNX export of another test does: meta tensors).
        strategy="ddp_spawn" if devices > 1 else "auto",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[_Record(tmp_path)],
        use_distributed_sampler=False,
    )
    trainer.fit(_module(), datamodule=_Batches(batches))


def test_two_processes_compute_the_losses_and_gradients_of_one(tmp_path):
    _fit(tmp_path, [_batch(_image_and_target(*A), _image_and_target(*B))], devices=1)
    # Rank r gets batches r, r + 2, ...: step 1 splits the same global batch; in step 2 only rank 1's
    # batch is broken (NaN boxes), and both ranks must skip it together.
    _fit(
        tmp_path,
        [
            _batch(_image_and_target(*A)),
            _batch(_image_and_target(*B)),
            _batch(_image_and_target(*A)),
            _batch(_image_and_target(*B, nan=True)),
        ],
        devices=2,
    )
    single = torch.load(tmp_path / "rank0_of_1.pt", weights_only=True)
    ranks = [torch.load(tmp_path / f"rank{r}_of_2.pt", weights_only=True) for r in range(2)]

    for key in BOX_LOSSES:  # normalized by all processes' boxes (4 / 2 per process), not 1 and 3
        mean = sum(rank["losses"][key] for rank in ranks) / 2
        assert abs(mean - single["losses"][key]) < 1e-6, key
    assert abs(ranks[0]["losses"]["loss_bbox"] - ranks[1]["losses"]["loss_bbox"]) > 1e-3  # really split
    torch.testing.assert_close(ranks[0]["grads"], single["grads"], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(ranks[1]["grads"], single["grads"], atol=1e-6, rtol=1e-4)

    assert [rank["skipped"] for rank in ranks] == [1, 1]  # the NaN on rank 1 skipped the step everywhere
    torch.testing.assert_close(ranks[0]["weights"], ranks[1]["weights"], atol=0, rtol=0)


def test_close_process_group_ends_the_group_once(tmp_path):
    assert close_process_group() is False  # no group: nothing to do
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert close_process_group() is True
    assert not dist.is_initialized()
    assert close_process_group() is False
