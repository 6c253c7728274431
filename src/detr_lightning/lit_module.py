"""The LightningModule: DETR + set criterion, the official optimizer recipe, and evaluation outputs.

The module is metric-free: validation/test steps return post-processed detections in original-image
pixels with their image ids, and the :class:`~detr_lightning.callbacks.CocoEvaluator` callback scores them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from lightning import LightningModule
from torch import Tensor

from detr_lightning.checkpoints import DETRFile, build_from_file, read_detr_file, saved_scoring
from detr_lightning.models import HungarianMatcher, PostProcess, SetCriterion, build_detr, build_weight_dict
from detr_lightning.models.criterion import class_score, prior_class_bias
from detr_lightning.models.weight_files import OFFICIAL_DETR_URLS, CheckpointError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------- settings (the config groups)
@dataclass
class LossConfig:
    """Set criterion weights (official: CE 1, L1 5, GIoU 2, no-object class 0.1, aux losses on)."""

    ce_loss_coef: float = 1.0  # weight of the classification loss (loss_ce), whichever class_loss
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    eos_coef: float = 0.1  # class_loss=ce only: weight of the "no object" class
    aux_loss: bool = True
    # ce (official softmax cross-entropy) | focal (sigmoid focal loss, Deformable DETR) | varifocal
    # (IoU-aware sigmoid loss, RT-DETR). The matcher's class cost and the post-processing follow it.
    class_loss: Literal["ce", "focal", "varifocal"] = "ce"
    focal_alpha: float = 0.25  # focal loss and focal matching cost: weight of the positives
    focal_gamma: float = 2.0  # focal / varifocal loss and focal matching cost: focusing exponent
    varifocal_alpha: float = 0.75  # varifocal: weight of the negatives (RT-DETR)
    prior_prob: float | None = 0.01  # sigmoid losses: class scores start at this probability (null: off)


@dataclass
class MatcherConfig:
    """Hungarian matcher cost weights (official: class 1, L1 5, GIoU 2)."""

    cost_class: float = 1.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    # softmax (official) | focal (Deformable DETR); null follows loss.class_loss (focal for the sigmoid
    # losses, with loss.focal_alpha / focal_gamma).
    class_cost: Literal["softmax", "focal"] | None = None


@dataclass
class OptimizerConfig:
    """AdamW with the backbone as its own parameter group (official recipe)."""

    lr: float = 1e-4
    lr_backbone: float = 1e-5  # <= 0 freezes the whole backbone
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    fused: bool | None = None  # null: PyTorch's default implementation choice


@dataclass
class SchedulerConfig:
    """StepLR stepped once per epoch: lr x gamma after lr_drop epochs (official: 200 of 300)."""

    lr_drop: int = 200
    gamma: float = 0.1


@dataclass
class PostprocessConfig:
    """Detections per image with a sigmoid class loss: the top_k best (query, class) scores
    (null: model.num_queries); the official softmax gives one per query."""

    top_k: int | None = None


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive training steps with a NaN/inf loss or gradients: the run cannot recover."""


class DETRLitModule(LightningModule):
    """Train and evaluate DETR.

    Every argument is a plain mapping (what Hydra composes), so checkpoints hold no pickled objects;
    the settings are read into the dataclasses above, which give their defaults and names.

    Args:
        model: :func:`~detr_lightning.models.build_detr` arguments (``num_classes`` required; ``pretrained``
            optional: a name, URL or file whose weights :meth:`load_pretrained` loads).
        matcher, loss, optimizer, scheduler, postprocess: :class:`MatcherConfig`, :class:`LossConfig`,
            :class:`OptimizerConfig`, :class:`SchedulerConfig`, :class:`PostprocessConfig` fields.
        max_consecutive_nonfinite: a step whose loss or gradients are NaN/inf is skipped (no weight or
            optimizer-state change; counted as ``train/skipped_steps``); this many in a row stop the run
            with a :class:`NonFiniteTrainingError` naming the batch's image ids.
    """

    def __init__(
        self,
        model: Mapping[str, Any],
        matcher: Mapping[str, Any] | None = None,
        loss: Mapping[str, Any] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        max_consecutive_nonfinite: int = 5,
        postprocess: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.skipped_steps = 0  # steps skipped for NaN/inf, over the whole run (kept in checkpoints)
        self._consecutive_skips = 0
        # Since the last optimizer step (gradient accumulation included): the losses waiting to be logged
        # once the step is known to be finite, and the batches' image ids (named if the step is skipped).
        self._pending_losses: list[tuple[dict[str, Tensor], Tensor, int]] = []
        self._step_image_ids: list[Tensor] = []
        self.loss_config = LossConfig(**(loss or {}))
        self.optimizer_config = OptimizerConfig(**(optimizer or {}))
        self.scheduler_config = SchedulerConfig(**(scheduler or {}))
        model_args = dict(model)
        self.pretrained = model_args.pop("pretrained", None)
        if model_args.get("num_classes") is None:
            raise ValueError(
                "model.num_classes must be set (train.py takes it from the data when left empty)"
            )
        if self.pretrained:
            model_args["pretrained_backbone"] = False  # DETR weights replace the ImageNet ones anyway
        if self.optimizer_config.lr_backbone <= 0:
            model_args["train_backbone"] = False
        self.model = build_detr(**model_args)
        loss = self.loss_config
        coefficients = {key: value for key, value in asdict(loss).items() if key.endswith("_loss_coef")}
        num_layers = len(self.model.transformer.decoder.layers)
        weight_dict = build_weight_dict(num_layers, self.model.aux_loss, **coefficients)
        self.class_score = class_score(loss.class_loss)  # softmax | sigmoid: matcher, post-processing follow
        matcher_config = MatcherConfig(**(matcher or {}))
        matcher_config.class_cost = matcher_config.class_cost or (
            "focal" if self.class_score == "sigmoid" else "softmax"
        )
        focal = {"focal_alpha": loss.focal_alpha, "focal_gamma": loss.focal_gamma}
        self.criterion = SetCriterion(
            self.model.num_classes,
            HungarianMatcher(**asdict(matcher_config), **focal),
            weight_dict,
            eos_coef=loss.eos_coef,
            class_loss=loss.class_loss,
            varifocal_alpha=loss.varifocal_alpha,
            **focal,
        )
        if self.class_score == "sigmoid" and loss.prior_prob is not None:
            # Every class score starts at prior_prob (Deformable DETR's init).
            torch.nn.init.constant_(self.model.class_embed.bias, prior_class_bias(loss.prior_prob))
        self.postprocess = PostProcess(self.class_score, top_k=PostprocessConfig(**(postprocess or {})).top_k)

    # ------------------------------------------------------------------ weights
    def load_pretrained(self, source: str | os.PathLike | DETRFile | None = None) -> None:
        """Load DETR weights (official name, URL or file, or a checkpoint of this project) into the model.

        The class head is replaced when ``num_classes`` differs, or when the file's class scores are read
        otherwise than this model's (the official softmax head means nothing to a sigmoid loss).
        ``train.py`` calls this when ``model.pretrained`` is set and the run does not resume.
        """
        source = source or self.pretrained
        if source is None:
            return
        arch = self.model.architecture
        official = str(getattr(source, "source", source)) in OFFICIAL_DETR_URLS  # no prior: refused unread
        if isinstance(source, DETRFile):
            file, source = source, source.source
        elif not (official and arch["spatial_prior"] != "none"):
            file = read_detr_file(source, nheads=arch["nheads"], dilation=arch["dilation"])
        file_prior = "none" if official else file.architecture.get("spatial_prior", "none")
        if file_prior != arch["spatial_prior"]:
            raise CheckpointError(
                f"model.pretrained={source}: its weights predict boxes with spatial_prior={file_prior}, "
                f"this model has model.spatial_prior={arch['spatial_prior']}, which reads box centres "
                "otherwise. Fix: model.spatial_prior=none to fine-tune official weights (the prior is for "
                "training from scratch)."
            )
        pretrained = build_from_file(file, num_classes=self.model.num_classes)
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
        if saved_scoring(file.contents)[0] != self.class_score:
            theirs.update({k: v.detach().clone() for k, v in ours.items() if k.startswith("class_embed.")})
            log.info("%s class scores: the class head starts fresh (not from %s)", self.class_score, source)
        self.model.load_state_dict(theirs, strict=not group_queries)
        self.model.copy_group_zero_queries()
        log.info("Loaded pretrained DETR weights from %s", source)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Label -> class name, so predict/export name classes from the checkpoint alone.
        try:
            names = dict(getattr(self.trainer.datamodule, "class_names", None) or {})
        except Exception:  # no Trainer attached, or a datamodule not set up (or without names): none saved
            names = {}
        if names:
            checkpoint["class_names"] = {int(label): str(name) for label, name in names.items()}
        checkpoint["skipped_steps"] = self.skipped_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.skipped_steps = int(checkpoint.get("skipped_steps", 0))

    # ------------------------------------------------------------------ steps
    def forward(self, images: Tensor, mask: Tensor | None = None) -> dict[str, Any]:
        return self.model(images, mask)

    def _losses(
        self, batch: Any, across_processes: bool = True
    ) -> tuple[dict[str, Any], dict[str, Tensor], Tensor]:
        """Outputs, loss dict and weighted total of ``batch``. ``across_processes``: the box normalizer
        counts every process's boxes (training); evaluation passes False, its shards differ in length."""
        images, mask, targets = batch
        outputs = self.model(images, mask)
        losses = self.criterion(outputs, targets, across_processes=across_processes)
        return outputs, losses, self.criterion.weighted_total(losses)

    def _log_losses(self, stage: str, losses: dict[str, Tensor], total: Tensor, batch_size: int) -> None:
        """The official log: scaled losses under their names, every value also ``_unscaled``."""
        weights = self.criterion.weight_dict
        values = {f"{stage}/{k}": v.detach() * weights[k] for k, v in losses.items() if k in weights}
        values.update({f"{stage}/{k}_unscaled": v.detach() for k, v in losses.items()})
        values[f"{stage}/class_error"] = losses["class_error"].detach()
        on_step = stage == "train"  # training logs every step; val/test epoch means, synced across ranks
        options = {"on_step": on_step, "on_epoch": True, "batch_size": batch_size, "sync_dist": not on_step}
        self.log_dict(values, **options)
        self.log(f"{stage}/loss", total.detach(), prog_bar=True, **options)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        _, losses, total = self._losses(batch)
        self._step_image_ids.extend(t["image_id"] for t in batch[2])  # read only if the step is skipped
        # Logged in on_before_optimizer_step once the step is known to be finite (one host sync per step):
        # a skipped NaN/inf step stays out of the epoch means.
        detached = {k: v.detach() for k, v in losses.items()}
        self._pending_losses.append((detached, total.detach(), len(batch[2])))
        return total

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning's clipping (``trainer.gradient_clip_val``, by norm as officially), also for a fused AdamW
        (``optimizer.fused=true``) when no gradient scaler runs (fp32, bf16-mixed).

        Lightning's mixed-precision plugin refuses every fused optimizer, because one that unscales
        fp16 gradients itself would be clipped while still scaled (Lightning-AI/pytorch-lightning#21435).
        Without a scaler the gradients are the true ones: they are clipped here with the same
        ``torch.nn.utils.clip_grad_norm_`` call over the optimizer's parameters that Lightning makes.
        """
        fused = any(group.get("fused") for group in optimizer.param_groups)
        unscaled = getattr(self.trainer.precision_plugin, "scaler", None) is None
        by_norm = gradient_clip_algorithm in (None, "norm")
        if gradient_clip_val and fused and unscaled and by_norm:
            parameters = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(parameters, gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Skip the update when the loss or any gradient is NaN/inf (on any process), and count it.

        The losses and the gradient norm are checked on the device and read back once."""
        pending, self._pending_losses = self._pending_losses, []
        totals = [total for _, total, _ in pending]
        bad = (~torch.isfinite(torch.stack(totals))).sum().to(torch.float32) if totals else torch.zeros(())
        bad = bad.to(self.device)
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        # With a GradScaler (16-mixed) overflowing gradients are the scaler's business: it skips them itself.
        if grads and getattr(self.trainer.precision_plugin, "scaler", None) is None:
            bad = bad + (~torch.isfinite(torch.nn.utils.get_total_norm(grads))).to(bad.dtype)
        if self.trainer.world_size > 1:  # the loss check is per process: every rank must skip together
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        image_ids, self._step_image_ids = self._step_image_ids, []
        if not bad.item():
            self._consecutive_skips = 0
            for losses, total, batch_size in pending:
                self._log_losses("train", losses, total, batch_size=batch_size)
            return
        optimizer.zero_grad(set_to_none=True)  # the optimizer leaves parameters without gradient alone
        self.skipped_steps += 1
        self._consecutive_skips += 1
        image_ids = [int(i) for i in image_ids]
        log.warning(
            f"Skipped step {self.global_step}: the loss or gradients are NaN/inf (batch image ids "
            f"{image_ids}; {self._consecutive_skips} in a row, {self.skipped_steps} in all)"
        )
        if self._consecutive_skips >= self.max_consecutive_nonfinite:
            raise NonFiniteTrainingError(
                f"training stopped at step {self.global_step}: {self._consecutive_skips} consecutive steps "
                f"had a NaN/inf loss or gradients (last batch: image ids {image_ids}; {self.skipped_steps} "
                "steps skipped in all); checkpoints keep the last finite weights. Fix: lower optimizer.lr, "
                "check those images' boxes, or train with precision=32-true "
                "(max_consecutive_nonfinite sets the patience)."
            )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        skipped = float(self.skipped_steps)
        self.log("train/skipped_steps", skipped, on_step=False, on_epoch=True, reduce_fx="max", batch_size=1)

    def _detect(self, outputs: dict[str, Any], targets: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        return self.postprocess(outputs, torch.stack([t["orig_size"] for t in targets]))

    def _evaluation_step(self, stage: str, batch: Any) -> dict[str, Any]:
        outputs, losses, total = self._losses(batch, across_processes=False)
        targets = batch[2]
        self._log_losses(stage, losses, total, batch_size=len(targets))
        return {
            "image_ids": torch.stack([t["image_id"] for t in targets]).tolist(),  # one host sync
            "detections": [{k: v.detach() for k, v in d.items()} for d in self._detect(outputs, targets)],
        }

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        return self._evaluation_step("val", batch)

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        return self._evaluation_step("test", batch)

    def predict_step(self, batch: Any, batch_idx: int) -> list[dict[str, Tensor]]:
        images, mask, targets = batch
        return self._detect(self.model(images, mask), targets)

    # ------------------------------------------------------------------ optimization
    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW with the backbone as its own group (official recipe), StepLR stepped every epoch."""
        settings = self.optimizer_config
        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        backbone = [p for n, p in trainable if "backbone" in n]
        groups = [{"params": [p for n, p in trainable if "backbone" not in n], "name": "transformer"}]
        if backbone:
            groups.append({"params": backbone, "lr": settings.lr_backbone, "name": "backbone"})
        optimizer = torch.optim.AdamW(
            groups,
            lr=settings.lr,
            weight_decay=settings.weight_decay,
            betas=tuple(settings.betas),
            eps=settings.eps,
            fused=settings.fused,
        )
        scheduler = torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=self.scheduler_config.lr_drop, gamma=self.scheduler_config.gamma
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
