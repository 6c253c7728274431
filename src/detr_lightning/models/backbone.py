"""ResNet backbone with frozen batch norm, as in the official DETR.

The state-dict layout (``body.conv1.weight``, ``body.layer1.0.bn1.running_mean``, ...) matches the
official checkpoints once this module sits at index 0 of :class:`BackboneWithPosition`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d

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


class FrozenNormConv2d(nn.Conv2d):
    """A convolution whose following frozen batch norm is applied to its weights instead of its output.

    ``conv(x, W) * s + b == conv(x, W * s) + b`` for the frozen norm's per-channel scale ``s`` and shift
    ``b``: one convolution with a bias instead of a convolution and two passes over the activations (and
    one fewer in the backward pass). The norm stays registered where it was, with its state-dict keys; it
    is only read here. Made by :func:`fold_frozen_batch_norms`.
    """

    folded_norm: FrozenBatchNorm2d

    def forward(self, x: Tensor) -> Tensor:
        norm = self.folded_norm
        scale = norm.weight * (norm.running_var + norm.eps).rsqrt()  # (C_out,)
        shift = norm.bias - norm.running_mean * scale
        weight = self.weight * scale.reshape(-1, 1, 1, 1)
        return F.conv2d(x, weight, shift, self.stride, self.padding, self.dilation, self.groups)


class AppliedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """A frozen batch norm already applied by the preceding :class:`FrozenNormConv2d`: passes through."""

    def forward(self, x: Tensor) -> Tensor:
        return x


def fold_frozen_batch_norms(resnet: nn.Module) -> int:
    """Fold every frozen batch norm of a torchvision ResNet into the convolution before it, in place.

    Pairs are ``conv1/bn1`` of the stem and of each block (``conv2/bn2``, ``conv3/bn3``) and each
    ``downsample`` (``0``/``1``). State-dict keys and values do not change. Returns the pairs folded.
    """
    folded = 0
    for module in resnet.modules():
        pairs = [(f"conv{i}", f"bn{i}") for i in (1, 2, 3)]
        if isinstance(module, nn.Sequential) and len(module) == 2:
            pairs.append(("0", "1"))  # a block's downsample: conv then norm
        for conv_name, norm_name in pairs:
            conv, norm = getattr(module, conv_name, None), getattr(module, norm_name, None)
            if type(conv) is nn.Conv2d and type(norm) is FrozenBatchNorm2d and conv.bias is None:
                conv.__class__ = FrozenNormConv2d
                conv.__dict__["folded_norm"] = norm  # a plain attribute: not a second registration
                norm.__class__ = AppliedFrozenBatchNorm2d
                folded += 1
    return folded


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
        name: str = "resnet50",
        dilation: bool = False,
        pretrained: bool = False,
        train_backbone: bool = True,
        trainable_layers: int = 3,
        norm: str = "frozen",
        output_stage: str = "layer4",
        fold_frozen_norm: bool = True,
    ) -> None:
        super().__init__()
        if not 0 <= trainable_layers <= len(STAGES_TOP_DOWN):
            raise ValueError(
                f"trainable_layers={trainable_layers} must be between 0 and {len(STAGES_TOP_DOWN)}"
            )
        if norm not in NORM_LAYERS:
            raise ValueError(f"unknown backbone norm {norm!r}; choose one of {sorted(NORM_LAYERS)}")
        if name not in RESNETS:
            raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(RESNETS)}")
        constructor, weights = RESNETS[name]
        if dilation and name in ("resnet18", "resnet34"):
            raise ValueError(
                f"backbone {name!r} has basic blocks, which torchvision cannot dilate; "
                "use resnet50 or resnet101 for DC5"
            )
        resnet = constructor(
            weights=None, replace_stride_with_dilation=[False, False, dilation], norm_layer=NORM_LAYERS[norm]
        )
        if pretrained:
            missing, unexpected = resnet.load_state_dict(fetch_torchvision_weights(weights), strict=False)
            missing = [k for k in missing if not k.endswith("num_batches_tracked")]
            if missing or unexpected:
                raise RuntimeError(
                    f"ImageNet weights of {name} do not fit: missing {missing}, unexpected {unexpected}"
                )
        if fold_frozen_norm and norm == "frozen":
            fold_frozen_batch_norms(resnet)
        trainable_stages = STAGES_TOP_DOWN[:trainable_layers] if train_backbone else ()
        for param_name, param in resnet.named_parameters():
            stage = "conv1" if param_name.startswith(("conv1.", "bn1.")) else param_name.split(".")[0]
            param.requires_grad_(stage in trainable_stages)
        if output_stage not in ("layer3", "layer4"):
            raise ValueError(f"output_stage={output_stage!r}: choose layer4 (official) or layer3")
        self.body = IntermediateLayerGetter(resnet, return_layers={output_stage: "0"})
        last_stage_channels = 512 if name in ("resnet18", "resnet34") else 2048
        self.num_channels = last_stage_channels if output_stage == "layer4" else last_stage_channels // 2
        self.stride = (16 if dilation else 32) if output_stage == "layer4" else 16

    def forward(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Run the trunk.

        Args:
            images: ``(B, 3, H, W)`` normalized, zero-padded images.
            mask: ``(B, H, W)`` bool, True on padding.

        Returns:
            ``features`` ``(B, C, h, w)`` with ``h = ceil(H / stride)``, and the mask down-sampled to
            ``(B, h, w)`` with nearest interpolation, exactly as the official code does.
        """
        features = self.body(images)["0"]
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
