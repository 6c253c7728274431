"""Numerical faults: NaN/inf losses and gradients are skipped and counted, a diverged run stops with the
batch's image ids, NaN weights are never checkpointed, degenerate boxes never crash matching or GIoU."""

from __future__ import annotations

import logging

import lightning
import pytest
import torch

from detr_lightning.fault_tolerance import RobustModelCheckpoint
from detr_lightning.models import HungarianMatcher, SetCriterion, build_weight_dict
from detr_lightning.training import exit_on_user_error
from test_lit_module import cpu_trainer, loader, make_module, synthetic_batches

from .conftest import load_checkpoint


def _trainer(tmp_path, **kwargs) -> lightning.Trainer:
    return cpu_trainer(tmp_path, **({"enable_checkpointing": False, "limit_val_batches": 0} | kwargs))


def _nan_boxes(batches, indices):
    """Batches whose first target has NaN boxes (a broken sample that got past every check)."""
    for index in indices:
        batches[index][2][0]["boxes"] = torch.full_like(batches[index][2][0]["boxes"], float("nan"))
    return batches


class _Snapshots(lightning.Callback):
    """A weight and the optimizer's step count before and after every training batch."""

    def __init__(self):
        self.weights, self.steps = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append(pl_module.model.class_embed.weight.detach().clone())
        state = trainer.optimizers[0].state.get(pl_module.model.class_embed.weight, {})
        self.steps.append(int(state["step"]) if "step" in state else 0)


def test_nan_loss_steps_are_skipped_counted_and_change_nothing(tmp_path):
    module, snapshots = make_module(), _Snapshots()
    before = module.model.class_embed.weight.detach().clone()
    trainer = _trainer(tmp_path, callbacks=[snapshots])
    trainer.fit(module, loader(_nan_boxes(synthetic_batches(3), [1])))
    weights = [before, *snapshots.weights]
    assert [not torch.equal(weights[i], weights[i + 1]) for i in range(3)] == [True, False, True]
    assert snapshots.steps == [1, 1, 2]  # AdamW's moments and step count untouched by the skip
    assert module.skipped_steps == 1 and float(trainer.callback_metrics["train/skipped_steps"]) == 1
    assert torch.isfinite(trainer.callback_metrics["train/loss_epoch"])  # skipped losses left out


def test_nan_gradients_with_a_finite_loss_are_skipped(tmp_path):
    module, snapshots = make_module(), _Snapshots()
    batches = synthetic_batches(3)
    seen = {}
    module.model.register_forward_pre_hook(lambda _, args: seen.update(images=args[0]))
    module.model.input_proj.weight.register_hook(  # a NaN that appears in backward only (batch 1)
        lambda grad: grad * float("nan") if torch.equal(seen["images"], batches[1][0]) else grad
    )
    trainer = _trainer(tmp_path, callbacks=[snapshots])
    trainer.fit(module, loader(batches))
    assert module.skipped_steps == 1
    assert snapshots.steps == [1, 1, 2]
    assert torch.equal(snapshots.weights[0], snapshots.weights[1])


def test_consecutive_nan_steps_stop_the_run_naming_the_images(tmp_path, caplog):
    module = make_module()
    module.max_consecutive_nonfinite = 2
    trainer = _trainer(tmp_path)
    with caplog.at_level(logging.WARNING), pytest.raises(SystemExit) as stopped, exit_on_user_error():
        trainer.fit(module, loader(_nan_boxes(synthetic_batches(4), [1, 2, 3])))
    message = str(stopped.value)
    assert message.startswith("error: training stopped at step 2: 2 consecutive steps had a NaN/inf loss")
    assert "image ids [4, 5]" in message and "Fix:" in message  # batch 2 holds images 4 and 5
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Skipped step")]
    assert skipped[0] == (
        "Skipped step 1: the loss or gradients are NaN/inf (batch image ids [2, 3]; 1 in a row, 1 in all)"
    )


class _PoisonAtEpoch(lightning.Callback):
    """Puts a NaN in the weights from epoch ``epoch`` on (as an optimizer bug or bad load would)."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            with torch.no_grad():
                pl_module.model.class_embed.bias[0] = float("nan")


def test_weights_with_nan_are_never_saved_as_best_or_last(tmp_path, caplog):
    checkpoint = RobustModelCheckpoint(
        dirpath=tmp_path, filename="best", monitor="val/loss", mode="min", save_last=True
    )
    trainer = _trainer(
        tmp_path,
        max_epochs=3,
        enable_checkpointing=True,
        limit_val_batches=1,
        limit_train_batches=1,
        num_sanity_val_steps=0,
        callbacks=[checkpoint, _PoisonAtEpoch(1)],
    )
    with caplog.at_level(logging.WARNING):
        trainer.fit(make_module(), loader(synthetic_batches(1)), loader(synthetic_batches(1)))
    assert trainer.current_epoch == 3  # the skipped NaN steps did not stop a 3-epoch run
    for name in ("best.ckpt", "last.ckpt"):
        saved = load_checkpoint(tmp_path / name)
        assert saved["epoch"] == 0, name
        assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())
    assert "Not saving checkpoints at step 2: the model weights hold NaN/inf" in caplog.text


# ------------------------------------------------------------------------------------ degenerate boxes

TARGETS = [
    {"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1]])},
    {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.6, 0.4, 0.3, 0.5]])},
]
DEGENERATE = {
    "zero width and height": [0.5, 0.5, 0.0, 0.0],
    "zero width": [0.3, 0.3, 0.0, 0.1],
    "zero height": [0.6, 0.4, 0.3, 0.0],
    "at the corner": [0.0, 0.0, 0.0, 0.0],
    "nan": [float("nan")] * 4,
    "inf": [float("inf"), 0.5, float("inf"), 0.1],
}


def _criterion() -> SetCriterion:
    return SetCriterion(3, HungarianMatcher(1, 5, 2), build_weight_dict(2, aux_loss=True), eos_coef=0.1)


def _outputs(box, queries=4):
    generator = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(2):  # last layer + one aux layer
        boxes = torch.rand(2, queries, 4, generator=generator) * 0.5 + 0.2
        boxes[:, : queries // 2] = torch.tensor(box)  # half the queries of every image degenerate
        logits = torch.randn(2, queries, 4, generator=generator)
        layers.append({"pred_logits": logits.requires_grad_(), "pred_boxes": boxes.requires_grad_()})
    return {**layers[0], "aux_outputs": [layers[1]]}


@pytest.mark.parametrize("case", list(DEGENERATE))
def test_degenerate_boxes_never_crash_matching(case):
    matching = HungarianMatcher(1, 5, 2)(_outputs(DEGENERATE[case]), TARGETS)
    for (queries, targets), target in zip(matching, TARGETS, strict=True):
        assert len(queries) == len(targets) == len(target["labels"])  # every object matched once
        assert len(set(queries.tolist())) == len(queries)


@pytest.mark.parametrize("case", [c for c in DEGENERATE if c not in ("nan", "inf")])
def test_zero_size_boxes_give_finite_losses_and_gradients(case):
    outputs = _outputs(DEGENERATE[case], queries=2)  # every query degenerate: they must be matched
    criterion = _criterion()
    losses = criterion(outputs, TARGETS)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    criterion.weighted_total(losses).backward()
    assert (
        torch.isfinite(outputs["pred_boxes"].grad).all() and torch.isfinite(outputs["pred_logits"].grad).all()
    )


@pytest.mark.parametrize("case", ["nan", "inf"])
def test_non_finite_boxes_give_a_non_finite_loss_not_an_exception(case):
    losses = _criterion()(_outputs(DEGENERATE[case], queries=2), TARGETS)  # the training step skips it
    assert not torch.isfinite(losses["loss_giou"]) or not torch.isfinite(losses["loss_bbox"])
    assert torch.isfinite(losses["loss_ce"])
