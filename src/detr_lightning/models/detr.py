"""DETR: backbone -> input projection -> transformer -> class and box heads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detr_lightning.batching import pad_images_to_batch
from detr_lightning.models.backbone import BackboneWithPosition, ResNetBackbone
from detr_lightning.models.position_encoding import build_position_encoding
from detr_lightning.models.spatial_prior import SPATIAL_PRIORS, GaussianSpatialPrior
from detr_lightning.models.transformer import Transformer


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (none after the last)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out, strict=True))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


class DETR(nn.Module):
    """The detection transformer.

    Args:
        backbone: backbone + position encoding.
        transformer: the encoder-decoder.
        num_classes: number of class slots (official convention: max category id + 1); the class head
            has ``num_classes + 1`` outputs, the last one meaning "no object".
        num_queries: number of object queries ``Q``.
        aux_loss: also return the predictions of every decoder layer but the last.
        num_groups: Group DETR (training only): ``K`` independent sets of ``Q`` queries decoded together,
            each group's self-attention restricted to itself, each matched to the targets on its own.
            Group 0 is ``query_embed``; the others live in ``query_embed_groups``. In eval mode only
            group 0 runs, so inference is the plain model. 1 (default) is the official model.
        spatial_prior: ``none`` (official) or ``gaussian``: a learned anchor and spread per query that
            bias the cross-attention and anchor the box centres (:mod:`.spatial_prior`; the
            ``spatial_prior`` parameters exist only then).
        spatial_prior_sigma: the Gaussian's starting spread (fraction of the image side).
    """

    def __init__(
        self,
        backbone: BackboneWithPosition,
        transformer: Transformer,
        num_classes: int,
        num_queries: int = 100,
        aux_loss: bool = True,
        num_groups: int = 1,
        spatial_prior: Literal["none", "gaussian"] = "none",
        spatial_prior_sigma: float = 0.2,
    ) -> None:
        super().__init__()
        if spatial_prior not in SPATIAL_PRIORS:
            raise ValueError(f"unknown spatial_prior {spatial_prior!r}; choose one of {SPATIAL_PRIORS}")
        if num_groups < 1:
            raise ValueError(f"num_groups={num_groups} must be at least 1")
        hidden_dim = transformer.d_model
        # Attribute order gives the official state-dict order.
        self.transformer = transformer
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.input_proj = nn.Conv2d(backbone.num_channels, hidden_dim, kernel_size=1)
        self.backbone = backbone
        if num_groups > 1:
            # Same initialisation as nn.Embedding; fine-tuning from official weights copies group 0 in.
            self.query_embed_groups = nn.Parameter(torch.randn((num_groups - 1) * num_queries, hidden_dim))
        self.spatial_prior = None
        if spatial_prior == "gaussian":
            self.spatial_prior = GaussianSpatialPrior(num_groups * num_queries, spatial_prior_sigma)
        self.num_groups = num_groups
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.aux_loss = aux_loss
        #: The keyword arguments of :func:`build_detr` that rebuild this architecture (set by it).
        self.architecture: dict[str, Any] = {}

    def forward(self, images: Tensor | Sequence[Tensor], mask: Tensor | None = None) -> dict[str, Any]:
        """Detect objects.

        Args:
            images: a list of normalized ``(3, H_i, W_i)`` images of any sizes (padded here), or a padded
                batch ``(B, 3, H, W)``.
            mask: ``(B, H, W)`` bool, True on padding, for a padded batch; None means no padding.

        Returns:
            ``pred_logits (B, Q, num_classes + 1)``, ``pred_boxes (B, Q, 4)`` normalized cxcywh relative
            to each unpadded image, and with ``aux_loss`` ``aux_outputs``: one dict of the same two keys
            for each decoder layer but the last.
        """
        if not (isinstance(images, Tensor) and images.dim() == 4):
            if mask is not None:
                raise ValueError("pass a mask only with a padded (B, 3, H, W) batch")
            images, mask = pad_images_to_batch(list(images))
        elif mask is None:
            mask = images.new_zeros((images.shape[0], *images.shape[-2:]), dtype=torch.bool)
        features, feature_mask, pos = self.backbone(images, mask)
        groups = self.num_groups if self.training else 1
        queries = self.query_embed.weight  # (Q, D)
        self_attn_mask = None
        if groups > 1:
            queries = torch.cat([queries, self.query_embed_groups])  # (K * Q, D)
            self_attn_mask = group_attention_mask(groups, self.num_queries, queries.device)
        cross_attn_bias = box_offset = None
        if self.spatial_prior is not None:
            num_heads = self.transformer.nhead
            cross_attn_bias = self.spatial_prior.attention_bias(feature_mask, queries.shape[0], num_heads)
            box_offset = self.spatial_prior.box_offset(queries.shape[0])  # (Q, 4)
        hs = self.transformer(
            self.input_proj(features), feature_mask, queries, pos, self_attn_mask, cross_attn_bias
        )[0]
        logits = self.class_embed(hs)  # (L, B, Q, C + 1)
        box_logits = self.bbox_embed(hs)  # (L, B, Q, 4)
        if box_offset is not None:
            box_logits = box_logits + box_offset.to(box_logits.dtype)
        boxes = box_logits.sigmoid()
        out: dict[str, Any] = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if groups > 1:
            out["num_groups"] = groups  # the criterion matches each block of Q queries separately
        if self.aux_loss:
            out["aux_outputs"] = [
                {"pred_logits": layer_logits, "pred_boxes": layer_boxes}
                for layer_logits, layer_boxes in zip(logits[:-1], boxes[:-1], strict=True)
            ]
        return out

    def copy_group_zero_queries(self) -> None:
        """Initialise every extra query group from group 0 (after loading official weights)."""
        if self.num_groups > 1:
            with torch.no_grad():
                self.query_embed_groups.copy_(self.query_embed.weight.repeat(self.num_groups - 1, 1))


def group_attention_mask(num_groups: int, num_queries: int, device: torch.device) -> Tensor:
    """``(K * Q, K * Q)`` bool, True where a query may not attend: outside its own group of ``Q``."""
    group_of_query = torch.arange(num_groups * num_queries, device=device) // num_queries
    return group_of_query[:, None] != group_of_query[None, :]


#: Arguments of :func:`build_detr` that say how the backbone's weights start and train: not part of the
#: architecture that rebuilds a model from a file.
TRAINING_ARGUMENTS = ("pretrained_backbone", "train_backbone", "trainable_backbone_layers")


def build_detr(
    num_classes: int,
    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101"] = "resnet50",
    dilation: bool = False,
    pretrained_backbone: bool = False,
    train_backbone: bool = True,
    trainable_backbone_layers: int = 3,
    backbone_norm: Literal["frozen", "batch"] = "frozen",
    backbone_output_stage: Literal["layer3", "layer4"] = "layer4",
    position_embedding: Literal["sine", "learned"] = "sine",
    hidden_dim: int = 256,
    nheads: int = 8,
    enc_layers: int = 6,
    dec_layers: int = 6,
    dim_feedforward: int = 2048,
    dropout: float = 0.1,
    activation: Literal["relu", "gelu"] = "relu",
    pre_norm: bool = False,
    num_queries: int = 100,
    aux_loss: bool = True,
    num_groups: int = 1,
    spatial_prior: Literal["none", "gaussian"] = "none",
    spatial_prior_sigma: float = 0.2,
) -> DETR:
    """Build a DETR from plain arguments (the official defaults give DETR-R50).

    ``pretrained_backbone`` loads torchvision's ImageNet weights into the ResNet; ``train_backbone=False``
    freezes it entirely (the official ``lr_backbone <= 0``); ``trainable_backbone_layers`` (official 3:
    conv1 and layer1 frozen) and ``backbone_norm`` (``frozen`` officially, ``batch`` to train a backbone
    from scratch) are passed to :class:`ResNetBackbone`. The model's ``architecture`` holds the other
    arguments.
    """
    arguments = dict(locals())  # first statement: exactly the arguments of the call
    trunk = ResNetBackbone(
        backbone,
        dilation=dilation,
        pretrained=pretrained_backbone,
        train_backbone=train_backbone,
        trainable_layers=trainable_backbone_layers,
        norm=backbone_norm,
        output_stage=backbone_output_stage,
    )
    joined = BackboneWithPosition(trunk, build_position_encoding(position_embedding, hidden_dim))
    transformer = Transformer(
        d_model=hidden_dim,
        nhead=nheads,
        num_encoder_layers=enc_layers,
        num_decoder_layers=dec_layers,
        dim_feedforward=dim_feedforward,
        dropout=dropout,
        activation=activation,
        normalize_before=pre_norm,
    )
    model = DETR(
        joined,
        transformer,
        num_classes=num_classes,
        num_queries=num_queries,
        aux_loss=aux_loss,
        num_groups=num_groups,
        spatial_prior=spatial_prior,
        spatial_prior_sigma=spatial_prior_sigma,
    )
    model.architecture = {key: value for key, value in arguments.items() if key not in TRAINING_ARGUMENTS}
    return model
