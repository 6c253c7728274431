"""Speed options of a training run: ``channels_last`` and ``torch.compile`` (see BENCHMARKS.md).

Both act on the DETR model in place, so checkpoints keep the plain parameter names (no ``_orig_mod.``)
and load into an uncompiled model for evaluation, prediction or export.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def apply_speed_options(
    model: nn.Module,
    channels_last: bool = False,
    compile: bool = False,
    compile_mode: str = "default",
    compile_dynamic: bool | None = None,
) -> nn.Module:
    """Put the model's convolutions in ``channels_last`` and/or compile its forward, in place.

    Args:
        model: a :class:`~detr_lightning.models.DETR` (any ``nn.Module`` with a ``backbone`` works).
        channels_last: store the backbone's 4-d weights as NHWC; convolutions then run NHWC (faster on
            GPUs' tensor cores; measured neutral to slower on CPU).
        compile: ``model.compile()``: the forward (and its backward) runs as fused Inductor kernels.
            The first steps, and each new input size, take longer while it compiles.
        compile_mode: ``default``; ``reduce-overhead`` adds CUDA graphs (fastest for fixed input sizes,
            one graph per size: multi-scale training captures many); ``max-autotune`` also tunes kernels.
        compile_dynamic: ``torch.compile``'s ``dynamic``: ``True`` compiles one graph for every input
            size (what multi-scale training needs), ``False`` one per size, ``None`` (PyTorch's
            default) re-compiles once with dynamic sizes after the first size change.

    Returns:
        The same model.
    """
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"speed.compile_mode={compile_mode!r}: choose one of {', '.join(COMPILE_MODES)}")
    if channels_last:
        target = getattr(model, "backbone", model)
        target.to(memory_format=torch.channels_last)
        log.info("Backbone in channels_last memory format")
    if compile:
        model.compile(mode=None if compile_mode == "default" else compile_mode, dynamic=compile_dynamic)
        log.info(
            "Model compiled with torch.compile (mode %s); the first steps include compilation", compile_mode
        )
    return model
