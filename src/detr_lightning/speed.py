"""Speed options of a run (the ``speed`` config group): ``channels_last`` and ``torch.compile``.

Both act on the model in place, so checkpoints keep the plain parameter names (no ``_orig_mod.``) and
load into an uncompiled model. BENCHMARKS.md has what each bought, and the opt-in glibc malloc setting.
"""

from __future__ import annotations

import logging
import typing
from typing import Literal

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

log = logging.getLogger(__name__)

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
COMPILE_MODES = typing.get_args(CompileMode)


def apply_speed_options(
    model: nn.Module,
    channels_last: bool = False,
    compile: bool = False,
    compile_mode: CompileMode = "default",
    compile_dynamic: bool | None = None,
) -> nn.Module:
    """Apply the speed options to ``model`` in place and return it.

    Args:
        model: a DETR (any ``nn.Module``; ``channels_last`` acts on its ``backbone`` if it has one).
        channels_last: store the backbone's 4-d weights as NHWC, so its convolutions run NHWC.
        compile: ``model.compile()``: forward and backward run as fused Inductor kernels. The first
            steps, and each new input size, include compilation.
        compile_mode: ``default``; ``reduce-overhead`` adds CUDA graphs (one per input size);
            ``max-autotune`` also tunes kernels.
        compile_dynamic: ``torch.compile``'s ``dynamic``: ``True`` one graph for every input size
            (multi-scale training), ``False`` one per size, ``None`` PyTorch's choice.
    """
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"speed.compile_mode={compile_mode!r}: choose one of {', '.join(COMPILE_MODES)}")
    if channels_last:
        getattr(model, "backbone", model).to(memory_format=torch.channels_last)
        log.info("Backbone in channels_last memory format")
    if compile:
        model.compile(mode=None if compile_mode == "default" else compile_mode, dynamic=compile_dynamic)
        log.info(
            "Model compiled with torch.compile (mode %s); the first steps include compilation", compile_mode
        )
    return model


def apply_speed_config(model: nn.Module, speed: DictConfig | None) -> nn.Module:
    """:func:`apply_speed_options` with a run's ``speed`` config group; None: the defaults."""
    options = OmegaConf.to_container(speed, resolve=True, enum_to_str=True) if speed is not None else {}
    return apply_speed_options(model, **options)
