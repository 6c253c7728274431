"""The LightningModule: DETR + set criterion, the official optimizer recipe, and evaluation outputs.

The module is metric-free: validation/test steps return post-processed detections in original-image
pixels with their image ids, and the :class:`~detr_lightning.callbacks.CocoEvaluator` callback scores them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import lightning
import torch
from torch import Tensor

from detr_lightning.checkpoints import ARCHITECTURE_KEY, CheckpointError, load_official_detr
from detr_lightning.models import HungarianMatcher, PostProcess, SetCriterion, build_detr, build_weight_dict

log = logging.getLogger(__name__)


class DETRLitModule(lightning.LightningModule):
    """Train and evaluate DETR.

    Every argument is a plain mapping (what Hydra composes), so checkpoints hold no pickled objects.

    Args:
        model: :func:`~detr_lightning.models.build_detr` arguments (``num_classes`` required; ``pretrained``
            optional: an official name, URL or file whose weights :meth:`load_pretrained` loads).
        matcher: ``cost_class``, ``cost_bbox``, ``cost_giou``.
        loss: ``eos_coef``, ``ce_loss_coef``, ``bbox_loss_coef``, ``giou_loss_coef``.
        optimizer: ``lr``, ``lr_backbone``, ``weight_decay`` (AdamW; ``betas``, ``eps``, ``fused`` optional).
        scheduler: ``lr_drop`` (epochs) and ``gamma`` of a StepLR.
    """

    def __init__(
        self,
        model: Mapping[str, Any],
        matcher: Mapping[str, Any] | None = None,
        loss: Mapping[str, Any] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        model_args = dict(model)
        self.pretrained = model_args.pop("pretrained", None)
        if model_args.get("num_classes") is None:
            raise ValueError(
                "model.num_classes must be set (train.py takes it from the data when left empty)"
            )
        self.optimizer_args = dict(optimizer or {})
        self.scheduler_args = dict(scheduler or {})
        if self.pretrained:
            model_args["pretrained_backbone"] = False  # DETR weights replace the ImageNet ones anyway
        if self.optimizer_args.get("lr_backbone", 1e-5) <= 0:
            model_args["train_backbone"] = False
        self.model = build_detr(**model_args)
        loss_args = dict(loss or {})
        weight_dict = build_weight_dict(
            num_decoder_layers=len(self.model.transformer.decoder.layers),
            aux_loss=self.model.aux_loss,
            ce_loss_coef=loss_args.get("ce_loss_coef", 1.0),
            bbox_loss_coef=loss_args.get("bbox_loss_coef", 5.0),
            giou_loss_coef=loss_args.get("giou_loss_coef", 2.0),
        )
        self.criterion = SetCriterion(
            self.model.num_classes,
            HungarianMatcher(**dict(matcher or {})),
            weight_dict,
            eos_coef=loss_args.get("eos_coef", 0.1),
        )
        self.postprocess = PostProcess()

    # ------------------------------------------------------------------ weights
    def load_pretrained(self, source: str | None = None) -> None:
        """Load official DETR weights (name, URL or file) into the model.

        The class head is replaced when ``num_classes`` differs. ``train.py`` calls this when
        ``model.pretrained`` is set and the run does not resume from a checkpoint.
        """
        source = source or self.pretrained
        if source is None:
            return
        arch = self.model.architecture
        pretrained = load_official_detr(
            source, num_classes=self.model.num_classes, nheads=arch["nheads"], dilation=arch["dilation"]
        )
        ours, theirs = self.model.state_dict(), pretrained.state_dict()
        group_queries = {"query_embed_groups"} if self.model.num_groups > 1 else set()
        mismatched = sorted(
            k
            for k in (set(ours) | set(theirs)) - group_queries
            if k not in ours or k not in theirs or ours[k].shape != theirs[k].shape
        )
        if mismatched:
            file_arch = {k: v for k, v in pretrained.architecture.items() if arch.get(k) != v}
            raise CheckpointError(
                f"model.pretrained={source} is a different architecture from the configured model: it has "
                f"{file_arch}. Fix: choose the matching backbone/transformer groups "
                f"(e.g. backbone=resnet50 transformer=detr model.num_queries=100 for detr_r50). "
                f"First differing keys: {mismatched[:5]}"
            )
        theirs = {k: v for k, v in theirs.items() if k not in group_queries}
        self.model.load_state_dict(theirs, strict=not group_queries)
        self.model.copy_group_zero_queries()
        log.info("Loaded pretrained DETR weights from %s", source)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[ARCHITECTURE_KEY] = dict(self.model.architecture)

    # ------------------------------------------------------------------ steps
    def forward(self, images: Tensor, mask: Tensor | None = None) -> dict[str, Any]:
        return self.model(images, mask)

    def _losses(self, batch: Any) -> tuple[dict[str, Any], dict[str, Tensor], Tensor]:
        images, mask, targets = batch
        outputs = self.model(images, mask)
        losses = self.criterion(outputs, targets)
        return outputs, losses, self.criterion.weighted_total(losses)

    def _log_losses(self, stage: str, losses: dict[str, Tensor], total: Tensor, batch_size: int) -> None:
        """The official log: scaled losses under their names, every value also ``_unscaled``."""
        weights = self.criterion.weight_dict
        values = {}
        values.update({f"{stage}/{k}": v.detach() * weights[k] for k, v in losses.items() if k in weights})
        values.update({f"{stage}/{k}_unscaled": v.detach() for k, v in losses.items()})
        values[f"{stage}/class_error"] = losses["class_error"].detach()
        on_step = stage == "train"
        self.log_dict(values, on_step=on_step, on_epoch=True, batch_size=batch_size, sync_dist=not on_step)
        self.log(
            f"{stage}/loss",
            total.detach(),
            prog_bar=True,
            on_step=on_step,
            on_epoch=True,
            batch_size=batch_size,
            sync_dist=not on_step,
        )

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        _, losses, total = self._losses(batch)
        self._log_losses("train", losses, total, batch_size=len(batch[2]))
        return total

    def _evaluation_step(self, stage: str, batch: Any) -> dict[str, Any]:
        outputs, losses, total = self._losses(batch)
        targets = batch[2]
        self._log_losses(stage, losses, total, batch_size=len(targets))
        orig_sizes = torch.stack([t["orig_size"] for t in targets])
        detections = self.postprocess(outputs, orig_sizes)
        return {
            "image_ids": torch.stack([t["image_id"] for t in targets]).tolist(),  # one host sync
            "detections": [{k: v.detach() for k, v in d.items()} for d in detections],
        }

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        return self._evaluation_step("val", batch)

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        return self._evaluation_step("test", batch)

    def predict_step(self, batch: Any, batch_idx: int) -> list[dict[str, Tensor]]:
        images, mask, targets = batch
        outputs = self.model(images, mask)
        return self.postprocess(outputs, torch.stack([t["orig_size"] for t in targets]))

    # ------------------------------------------------------------------ optimization
    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW with the backbone as its own group (official recipe), StepLR stepped every epoch."""
        args = self.optimizer_args
        backbone = [p for n, p in self.model.named_parameters() if "backbone" in n and p.requires_grad]
        rest = [p for n, p in self.model.named_parameters() if "backbone" not in n and p.requires_grad]
        groups = [{"params": rest, "name": "transformer"}]
        if backbone:
            groups.append({"params": backbone, "lr": args.get("lr_backbone", 1e-5), "name": "backbone"})
        optimizer = torch.optim.AdamW(
            groups,
            lr=args.get("lr", 1e-4),
            weight_decay=args.get("weight_decay", 1e-4),
            betas=tuple(args.get("betas", (0.9, 0.999))),
            eps=args.get("eps", 1e-8),
            fused=args.get("fused"),
        )
        scheduler = torch.optim.lr_scheduler.StepLR(
            optimizer,
            step_size=self.scheduler_args.get("lr_drop", 200),
            gamma=self.scheduler_args.get("gamma", 0.1),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
