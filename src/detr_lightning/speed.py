"""Speed options of a run (the ``speed`` config group): ``channels_last`` and ``torch.compile``.

Both act on the model in place, so checkpoints keep the plain parameter names (no ``_orig_mod.``) and
load into an uncompiled model. BENCHMARKS.md has what each bought, and the opt-in glibc malloc setting.
``speed=gpu`` (``conf/speed/gpu.yaml``) sets them with the other GPU levers (precision, shape buckets,
loader workers).
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
CompileTarget = Literal["model", "transformer"]


def apply_speed_options(
    model: nn.Module,
    channels_last: bool = False,
    compile: bool = False,
    compile_mode: CompileMode = "default",
    compile_dynamic: bool | None = None,
    compile_target: CompileTarget = "model",
    compile_recompile_limit: int | None = None,
) -> nn.Module:
    """Apply the speed options to ``model`` in place and return it (the config schema checks the choices,
    ``config.check_values`` the recompile limit).

    Args:
        model: a DETR (any ``nn.Module``; ``channels_last`` acts on its ``backbone`` if it has one).
        channels_last: store the backbone's 4-d weights as NHWC, so its convolutions run NHWC.
        compile: ``model.compile()``: forward and backward run as fused Inductor kernels. The first
            steps, and each new input size, include compilation.
        compile_mode: ``default``; ``reduce-overhead`` adds CUDA graphs (one per input size);
            ``max-autotune`` also tunes kernels.
        compile_dynamic: ``torch.compile``'s ``dynamic``: ``True`` one graph for every input size
            (multi-scale training), ``False`` one per size, ``None`` PyTorch's choice.
        compile_target: what ``compile`` compiles: ``model``, the whole forward (and backward); or
            ``transformer``, the encoder-decoder only (``model.transformer``), the backbone running its
            convolutions eagerly (cuDNN). In training, Inductor specializes the convolutions' backward on
            the feature map's size (seen with torch 2.14), so the whole model compiles again for every
            batch shape whatever ``compile_dynamic`` (shape buckets, ``data.pad_to_multiple``, bound how
            often); the transformer with ``compile_dynamic=True`` compiled once for them all.
        compile_recompile_limit: ``torch._dynamo.config.recompile_limit``, for the whole process (None:
            PyTorch's, 8): how many graphs a function compiles before it runs uncompiled for new shapes.
    """
    if channels_last:
        getattr(model, "backbone", model).to(memory_format=torch.channels_last)
        log.info("Backbone in channels_last memory format")
    if compile:
        if compile_recompile_limit is not None:
            import torch._dynamo as dynamo  # here: importing it costs a second

            dynamo.config.recompile_limit = compile_recompile_limit
        target = model if compile_target == "model" else model.transformer
        target.compile(mode=None if compile_mode == "default" else compile_mode, dynamic=compile_dynamic)
        log.info(
            "%s compiled with torch.compile (mode %s); the first steps include compilation",
            "Model" if compile_target == "model" else "Transformer",
            compile_mode,
        )
    return model


def apply_speed_config(model: nn.Module, speed: DictConfig | None) -> nn.Module:
    """:func:`apply_speed_options` with a run's ``speed`` config group; None: the defaults."""
    options = OmegaConf.to_container(speed, resolve=True, enum_to_str=True) if speed is not None else {}
    return apply_speed_options(model, **options)
