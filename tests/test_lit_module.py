"""The LightningModule on synthetic batches: optimizer recipe, logged losses, checkpoints, pretrained."""

from __future__ import annotations

import lightning
import pytest
import torch
from torch.utils.data import DataLoader

from detr_lightning import load_detr
from detr_lightning.batching import pad_images_to_batch
from detr_lightning.checkpoints import CheckpointError
from detr_lightning.lit_module import DETRLitModule
from detr_lightning.models import build_detr
from tiny_detr import tiny_detr_kwargs

TINY_MODEL = tiny_detr_kwargs(num_queries=6)


def synthetic_batches(count=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for index in range(count):
        images = [torch.randn(3, 64, 64, generator=generator), torch.randn(3, 48, 80, generator=generator)]
        padded, mask = pad_images_to_batch(images)
        targets = [
            {
                "labels": torch.tensor([1, 2]),
                "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.2]]),
                "image_id": torch.tensor(2 * index),
                "orig_size": torch.tensor([128, 128]),
            },
            {
                "labels": torch.tensor([0]),
                "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]]),
                "image_id": torch.tensor(2 * index + 1),
                "orig_size": torch.tensor([96, 160]),
            },
        ]
        batches.append((padded, mask, targets))
    return batches


def loader(batches):
    return DataLoader(batches, batch_size=None, collate_fn=lambda b: b)


def make_module(**optimizer):
    return DETRLitModule(
        model=TINY_MODEL,
        matcher={"cost_class": 1, "cost_bbox": 5, "cost_giou": 2},
        loss={"eos_coef": 0.1, "bbox_loss_coef": 5, "giou_loss_coef": 2},
        optimizer={"lr": 1e-4, "lr_backbone": 1e-5, "weight_decay": 1e-4, **optimizer},
        scheduler={"lr_drop": 2, "gamma": 0.1},
    )


def test_optimizer_has_the_official_groups():
    module = make_module()
    config = module.configure_optimizers()
    optimizer = config["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups["transformer"]["lr"] == 1e-4 and groups["backbone"]["lr"] == 1e-5
    assert all(g["weight_decay"] == 1e-4 for g in optimizer.param_groups)
    backbone_ids = {id(p) for p in groups["backbone"]["params"]}
    for name, param in module.model.named_parameters():
        in_backbone = id(param) in backbone_ids
        assert in_backbone == ("backbone" in name and param.requires_grad), name
    assert config["lr_scheduler"]["scheduler"].step_size == 2


def test_zero_backbone_lr_freezes_the_backbone():
    module = make_module(lr_backbone=0)
    assert not any(p.requires_grad for n, p in module.model.named_parameters() if "backbone" in n)
    assert [g["name"] for g in module.configure_optimizers()["optimizer"].param_groups] == ["transformer"]


def cpu_trainer(root, **overrides) -> lightning.Trainer:
    """A quiet CPU Trainer writing under ``root``: no logger, progress bar, model summary or sanity check, the
    official clipping (0.1), one epoch; ``overrides`` replace any of these."""
    options = dict(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=0.1,
        default_root_dir=root,
        num_sanity_val_steps=0,
    )
    return lightning.Trainer(**(options | overrides))


def test_fit_logs_the_official_losses_and_checkpoints_load_safely(tmp_path):
    module = make_module()
    trainer = cpu_trainer(tmp_path, max_epochs=2)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer.fit(
        module, train_dataloaders=loader(synthetic_batches()), val_dataloaders=loader(synthetic_batches(1))
    )
    logged = trainer.callback_metrics
    for key in (
        "loss",
        "loss_ce",
        "loss_bbox",
        "loss_giou",
        "loss_ce_0",
        "loss_bbox_0",
        "loss_giou_0",
        "class_error",
    ):
        assert f"train/{key}_epoch" in logged and torch.isfinite(logged[f"train/{key}_epoch"]), key
    for key in ("loss_ce_unscaled", "cardinality_error_unscaled", "cardinality_error_0_unscaled"):
        assert f"train/{key}_epoch" in logged, key
    torch.testing.assert_close(logged["train/loss_bbox_epoch"], 5 * logged["train/loss_bbox_unscaled_epoch"])
    assert "val/loss" in logged and "val/loss_giou_0" in logged
    changed = [k for k, v in module.model.state_dict().items() if not torch.equal(v, before[k])]
    assert "class_embed.weight" in changed and "backbone.0.body.layer4.0.conv1.weight" in changed
    assert "backbone.0.body.layer1.0.conv1.weight" not in changed  # frozen, as officially
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0] == pytest.approx(1e-5)  # dropped at 2

    path = tmp_path / "module.ckpt"
    trainer.save_checkpoint(path)
    reloaded = load_detr(path)  # weights_only=True: a checkpoint of ours holds no pickled objects
    for key, value in module.model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    restored = DETRLitModule.load_from_checkpoint(path, weights_only=True)
    assert restored.model.architecture == module.model.architecture


def test_validation_step_returns_detections_in_original_pixels():
    module = make_module().eval()
    batch = synthetic_batches(1)[0]
    with torch.no_grad():
        out = module.predict_step(batch, 0)
    assert len(out) == 2 and out[0]["boxes"].shape == (6, 4)
    assert out[1]["boxes"][:, 0::2].max() <= 160 * 1.5  # scaled by the original width, not the padded input


def test_pretrained_weights_replace_the_class_head(tmp_path):
    source = build_detr(**{**TINY_MODEL, "num_classes": 7})
    path = tmp_path / "official.pth"
    torch.save({"model": source.state_dict()}, path)
    module = make_module()
    module.load_pretrained(str(path))
    assert module.model.class_embed.out_features == 4
    torch.testing.assert_close(module.model.query_embed.weight, source.query_embed.weight)

    bigger = build_detr(**{**TINY_MODEL, "num_queries": 9})
    torch.save({"model": bigger.state_dict()}, path)
    with pytest.raises(CheckpointError, match="different architecture"):
        module.load_pretrained(str(path))


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "64-true"])
def test_mixed_precision_trains_with_finite_losses(tmp_path, precision):
    """CPU autocast (16-mixed falls back to bf16 on CPU); matching and losses stay in float32. 64-true
    (Lightning casts the model and the batch's floats, targets included, to float64) trains too."""
    module = make_module()
    trainer = cpu_trainer(tmp_path, precision=precision, enable_checkpointing=False)
    trainer.fit(
        module, train_dataloaders=loader(synthetic_batches(2)), val_dataloaders=loader(synthetic_batches(1))
    )
    assert torch.isfinite(trainer.callback_metrics["train/loss_epoch"])
    assert torch.isfinite(trainer.callback_metrics["val/loss"])


def test_fused_adamw_clips_gradients_under_bf16_as_the_default_adamw(tmp_path):
    """Lightning's mixed-precision plugin refuses to clip for a fused optimizer; without a gradient scaler
    (bf16-mixed) the module clips itself, by norm, as Lightning does for the default AdamW."""

    def trained_weights(fused: bool | None, clip: float | None) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        module = make_module(fused=fused)
        trainer = cpu_trainer(
            tmp_path,
            precision="bf16-mixed",
            max_epochs=None,
            max_steps=2,
            enable_checkpointing=False,
            gradient_clip_val=clip,
            limit_val_batches=0,
        )
        trainer.fit(module, train_dataloaders=loader(synthetic_batches(2)))
        assert all(group["fused"] is fused for group in trainer.optimizers[0].param_groups)
        return {name: p.detach().clone() for name, p in module.model.named_parameters()}

    fused, default = trained_weights(True, 0.1), trained_weights(None, 0.1)
    for name, weight in fused.items():
        torch.testing.assert_close(weight, default[name], rtol=1e-5, atol=1e-6, msg=name)
    unclipped = trained_weights(True, None)
    assert any(not torch.allclose(fused[name], weight) for name, weight in unclipped.items())  # it clipped
