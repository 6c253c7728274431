"""ResNet backbone with frozen batch norm, as in the official DETR.

The state-dict layout (``body.conv1.weight``, ``body.layer1.0.bn1.running_mean``, ...) matches the
official checkpoints once this module sits at index 0 of :class:`BackboneWithPosition`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from detr_lightning.models.position_encoding import PositionEncoding
from detr_lightning.models.weight_files import fetch_torchvision_weights

#: torchvision constructor and ImageNet weights enum for each supported ResNet.
RESNETS = {
    "resnet18": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (torchvision.models.resnet34, torchvision.models.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V1),
    "resnet101": (torchvision.models.resnet101, torchvision.models.ResNet101_Weights.IMAGENET1K_V1),
}

#: ResNet stages from the top; ``trainable_layers=k`` trains the last ``k`` of them (official: 3, i.e.
#: conv1 and layer1 frozen; torchvision's ``trainable_backbone_layers`` has the same meaning).
STAGES_TOP_DOWN = ("layer4", "layer3", "layer2", "layer1", "conv1")

#: Normalization layers: ``frozen`` (official, for pretrained weights) or trainable ``batch`` norm
#: (for a backbone trained from scratch, where frozen identity statistics leave activations unscaled).
NORM_LAYERS = {"frozen": FrozenBatchNorm2d, "batch": nn.BatchNorm2d}


class AppliedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """A frozen batch norm that the convolution before it applies (:class:`FrozenNormConv2d`): it
    holds the statistics, under the usual state-dict keys, and passes its input through."""

    def forward(self, x: Tensor) -> Tensor:
        return x


class FrozenNormConv2d(nn.Module):
    """A bias-free convolution followed by its frozen batch norm, computed as one convolution.

    ``conv(x, W) * s + b == conv(x, W * s) + b`` for the norm's per-channel scale ``s`` and shift ``b``:
    one convolution with a bias instead of a convolution and two passes over the activations. The
    convolution's weight stays registered here (``conv1.weight``), the norm's statistics where the norm
    sits (``bn1.running_mean``): the state dict is that of the convolution and norm it replaces.
    """

    def __init__(self, conv: nn.Conv2d, norm: AppliedFrozenBatchNorm2d) -> None:
        super().__init__()
        if conv.bias is not None:
            raise ValueError("FrozenNormConv2d folds a norm into a bias-free convolution only")
        self.weight = conv.weight
        self.options = {name: getattr(conv, name) for name in ("stride", "padding", "dilation", "groups")}
        # A plain attribute, not a submodule: the norm is registered (and saved) at its own place.
        self.__dict__["norm"] = norm

    def forward(self, x: Tensor) -> Tensor:
        norm = self.norm
        scale = norm.weight * (norm.running_var + norm.eps).rsqrt()  # (C_out,)
        shift = norm.bias - norm.running_mean * scale
        return F.conv2d(x, self.weight * scale.reshape(-1, 1, 1, 1), shift, **self.options)


def fold_frozen_batch_norms(resnet: nn.Module) -> None:
    """Replace the convolution before every :class:`AppliedFrozenBatchNorm2d` of a torchvision ResNet
    by a :class:`FrozenNormConv2d`, in place; raises when a norm is left without its convolution."""
    folded = 0
    for module in list(resnet.modules()):
        names = [(f"conv{i}", f"bn{i}") for i in (1, 2, 3)] + [("0", "1")]
        for conv_name, norm_name in names:
            conv, norm = getattr(module, conv_name, None), getattr(module, norm_name, None)
            if isinstance(norm, AppliedFrozenBatchNorm2d) and type(conv) is nn.Conv2d:
                setattr(module, conv_name, FrozenNormConv2d(conv, norm))
                folded += 1
    norms = sum(isinstance(module, AppliedFrozenBatchNorm2d) for module in resnet.modules())
    if folded != norms:
        raise RuntimeError(f"folded {folded} of {norms} frozen batch norms: not a torchvision ResNet?")


class ResNetBackbone(nn.Module):
    """ResNet-18/34/50/101 trunk returning the last stage's feature map and its padding mask.

    Args:
        name: one of :data:`RESNETS`.
        dilation: replace the stride of ``layer4`` by dilation (the "DC5" models: output stride 16).
        pretrained: load torchvision's ImageNet weights (through torchvision's weights API, cached in the
            torch hub directory; offline: :class:`~.weight_files.WeightsUnavailableError`).
        train_backbone: when False every backbone parameter is frozen (official ``lr_backbone <= 0``).
        trainable_layers: how many stages train, counted from ``layer4`` down to ``conv1`` (0-5; official 3).
        norm: ``frozen`` batch norm (official; its statistics come from the weights) or ``batch`` (trainable,
            for training from scratch; adds ``num_batches_tracked`` buffers to the state dict).
        output_stage: ``layer4`` (official, stride 32) or ``layer3`` (stride 16 at a fraction of the compute,
            for small images; the model then has no ``layer4`` weights).
        fold_frozen_norm: run each frozen batch norm as part of the convolution before it (same result
            and state dict, fewer passes over the activations; see :class:`FrozenNormConv2d`).
    """

    def __init__(
        self,
        name: Literal["resnet18", "resnet34", "resnet50", "resnet101"] = "resnet50",
        dilation: bool = False,
        pretrained: bool = False,
        train_backbone: bool = True,
        trainable_layers: int = 3,
        norm: Literal["frozen", "batch"] = "frozen",
        output_stage: Literal["layer3", "layer4"] = "layer4",
        fold_frozen_norm: bool = True,
    ) -> None:
        super().__init__()
        if not 0 <= trainable_layers <= len(STAGES_TOP_DOWN):
            raise ValueError(
                f"trainable_backbone_layers={trainable_layers} must be between 0 and {len(STAGES_TOP_DOWN)}"
            )
        if norm not in NORM_LAYERS:
            raise ValueError(f"unknown backbone norm {norm!r}; choose one of {sorted(NORM_LAYERS)}")
        if name not in RESNETS:
            raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(RESNETS)}")
        if output_stage not in ("layer3", "layer4"):
            raise ValueError(f"output_stage={output_stage!r}: choose layer4 (official) or layer3")
        basic_blocks = name in ("resnet18", "resnet34")
        if dilation and basic_blocks:
            raise ValueError(
                f"backbone {name!r} has basic blocks, which torchvision cannot dilate; "
                "use resnet50 or resnet101 for DC5"
            )
        fold = fold_frozen_norm and norm == "frozen"
        constructor, weights = RESNETS[name]
        resnet = constructor(
            weights=None,
            replace_stride_with_dilation=[False, False, dilation],
            norm_layer=AppliedFrozenBatchNorm2d if fold else NORM_LAYERS[norm],
        )
        if fold:
            fold_frozen_batch_norms(resnet)
        if pretrained:
            missing, unexpected = resnet.load_state_dict(fetch_torchvision_weights(weights), strict=False)
            missing = [k for k in missing if not k.endswith("num_batches_tracked")]
            if missing or unexpected:
                raise RuntimeError(
                    f"ImageNet weights of {name} do not fit: missing {missing}, unexpected {unexpected}"
                )
        trainable_stages = STAGES_TOP_DOWN[:trainable_layers] if train_backbone else ()
        for param_name, param in resnet.named_parameters():
            stage = "conv1" if param_name.startswith(("conv1.", "bn1.")) else param_name.split(".")[0]
            param.requires_grad_(stage in trainable_stages)
        stages = list(resnet.named_children())  # conv1, bn1, relu, maxpool, layer1 ... layer4, avgpool, fc
        last = [name for name, _ in stages].index(output_stage)
        self.body = nn.Sequential(OrderedDict(stages[: last + 1]))  # keys body.conv1.*, body.layer1.* ...
        last_stage_channels = 512 if basic_blocks else 2048
        self.num_channels = last_stage_channels if output_stage == "layer4" else last_stage_channels // 2
        self.stride = 16 if dilation or output_stage == "layer3" else 32

    def forward(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """``images (B, 3, H, W)`` normalized and zero-padded, ``mask (B, H, W)`` True on padding ->
        ``features (B, C, h, w)`` with ``h = ceil(H / stride)``, and the mask down-sampled to
        ``(B, h, w)`` by nearest interpolation, as the official code does."""
        features = self.body(images)
        feature_mask = F.interpolate(mask[None].float(), size=features.shape[-2:]).to(torch.bool)[0]
        return features, feature_mask


class BackboneWithPosition(nn.Sequential):
    """The backbone (index 0) and its position encoding (index 1), as the official ``Joiner``.

    Being a ``Sequential`` gives the official key names ``backbone.0.body.*`` / ``backbone.1.*``.
    """

    def __init__(self, backbone: ResNetBackbone, position_encoding: PositionEncoding) -> None:
        super().__init__(backbone, position_encoding)
        self.num_channels = backbone.num_channels

    def forward(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        """Returns ``features (B, C, h, w)``, ``feature_mask (B, h, w)`` and ``pos (B, D, h, w)``."""
        features, feature_mask = self[0](images, mask)
        pos = self[1](feature_mask).to(features.dtype)
        return features, feature_mask, pos
