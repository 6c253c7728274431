"""The tiny DETR of the unit tests (ResNet-18 without pretrained weights, width 32, one encoder layer).

Tests that build a model take its keyword arguments from `tiny_detr_kwargs`, changing only what they
test (classes, queries, decoder layers, dropout), so the tiny architecture is defined once.
"""

from __future__ import annotations

from typing import Any

_TINY_DETR: dict[str, Any] = dict(
    num_classes=3,
    backbone="resnet18",
    hidden_dim=32,
    nheads=2,
    enc_layers=1,
    dec_layers=2,
    dim_feedforward=64,
    num_queries=6,
    pretrained_backbone=False,
)


def tiny_detr_kwargs(**overrides: Any) -> dict[str, Any]:
    """``build_detr(**...)`` / ``DETRLitModule(model=...)`` arguments of the tiny DETR, with ``overrides``
    (a new dict on every call)."""
    return {**_TINY_DETR, **overrides}
