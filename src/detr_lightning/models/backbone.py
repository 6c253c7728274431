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

#: torchvision constructor and ImageNet weights enum for each supported ResNet.
RESNETS = {
    "resnet18": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (torchvision.models.resnet34, torchvision.models.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V1),
    "resnet101": (torchvision.models.resnet101, torchvision.models.ResNet101_Weights.IMAGENET1K_V1),
}

#: Parameters whose name contains one of these train (when the backbone trains at all); conv1 and
#: layer1 stay frozen, as in the official code.
TRAINABLE_STAGES = ("layer2", "layer3", "layer4")


class ResNetBackbone(nn.Module):
    """ResNet-18/34/50/101 trunk returning the last stage's feature map and its padding mask.

    Args:
        name: one of :data:`RESNETS`.
        dilation: replace the stride of ``layer4`` by dilation (the "DC5" models: output stride 16).
        pretrained: load torchvision's ImageNet weights (through torchvision's weights API, cached in the
            torch hub directory; offline: :class:`~detr_lightning.checkpoints.WeightsUnavailableError`).
        train_backbone: when False every backbone parameter is frozen (official ``lr_backbone <= 0``).
    """

    def __init__(
        self,
        name: str = "resnet50",
        dilation: bool = False,
        pretrained: bool = False,
        train_backbone: bool = True,
    ) -> None:
        super().__init__()
        if name not in RESNETS:
            raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(RESNETS)}")
        constructor, weights = RESNETS[name]
        if dilation and name in ("resnet18", "resnet34"):
            raise ValueError(
                f"backbone {name!r} has basic blocks, which torchvision cannot dilate; "
                "use resnet50 or resnet101 for DC5"
            )
        resnet = constructor(
            weights=None, replace_stride_with_dilation=[False, False, dilation], norm_layer=FrozenBatchNorm2d
        )
        if pretrained:
            from detr_lightning.checkpoints import fetch_torchvision_weights

            resnet.load_state_dict(fetch_torchvision_weights(weights))
        for param_name, param in resnet.named_parameters():
            trainable = train_backbone and any(stage in param_name for stage in TRAINABLE_STAGES)
            param.requires_grad_(trainable)
        self.body = IntermediateLayerGetter(resnet, return_layers={"layer4": "0"})
        self.num_channels = 512 if name in ("resnet18", "resnet34") else 2048
        self.stride = 16 if dilation else 32

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
