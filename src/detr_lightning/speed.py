"""Speed options of a training run: ``channels_last``, fast CPU dropout masks, host-memory reuse and
``torch.compile``.

See BENCHMARKS.md for what each one bought.

Both act on the DETR model in place, so checkpoints keep the plain parameter names (no ``_orig_mod.``)
and load into an uncompiled model for evaluation, prediction or export.
"""

from __future__ import annotations

import ctypes
import logging
import platform

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from detr_lightning.models.dropout import use_fast_dropout

log = logging.getLogger(__name__)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# glibc's mallopt(3) parameters and the size above which a freed block stays in the heap.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_HEAP_RETENTION_BYTES = 1 << 30


def reuse_freed_host_memory() -> bool:
    """Keep freed tensor memory in the process heap (glibc), so the next step reuses it.

    By default glibc hands each large block (tens of MB: a ResNet-50 activation of a 512x681 batch)
    its own ``mmap`` and unmaps it when the tensor is freed, so every training step faults the same
    memory in again and the kernel zeroes it page by page. Raising ``M_MMAP_THRESHOLD`` and
    ``M_TRIM_THRESHOLD`` to 1 GiB keeps those blocks for reuse (what jemalloc/tcmalloc give when
    preloaded). The process's resident memory then stays near its peak instead of shrinking between
    steps. With one input size the peak stays as it was (the DETR-R50 train step); with changing sizes
    fragmentation can raise it (BENCHMARKS.md, inference at batch 1 then 8). Returns False, changing
    nothing, where the C library is not glibc.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(
        libc.mallopt(_M_MMAP_THRESHOLD, _HEAP_RETENTION_BYTES)
        and libc.mallopt(_M_TRIM_THRESHOLD, _HEAP_RETENTION_BYTES)
    )


def apply_speed_options(
    model: nn.Module,
    channels_last: bool = False,
    compile: bool = False,
    compile_mode: str = "default",
    compile_dynamic: bool | None = None,
    fast_dropout: bool = False,
    reuse_freed_memory: bool = False,
) -> nn.Module:
    """Apply the speed options to ``model`` in place (and, for ``reuse_freed_memory``, to the process).

    Args:
        model: a :class:`~detr_lightning.models.DETR` (any ``nn.Module`` with a ``backbone`` works).
        channels_last: store the backbone's 4-d weights as NHWC; convolutions then run NHWC (10% off the
            DETR-R50 step on a 2-core CPU; launch-bound small GPU steps gain nothing).
        compile: ``model.compile()``: the forward (and its backward) runs as fused Inductor kernels.
            The first steps, and each new input size, take longer while it compiles.
        compile_mode: ``default``; ``reduce-overhead`` adds CUDA graphs (fastest for fixed input sizes,
            one graph per size: multi-scale training captures many); ``max-autotune`` also tunes kernels.
        compile_dynamic: ``torch.compile``'s ``dynamic``: ``True`` compiles one graph for every input
            size (what multi-scale training needs), ``False`` one per size, ``None`` (PyTorch's
            default) re-compiles once with dynamic sizes after the first size change.
        fast_dropout: draw CPU dropout masks (layers and attention weights) with NumPy's PCG64 instead
            of PyTorch's one-thread Mersenne Twister (:mod:`detr_lightning.models.dropout`): the same
            Bernoulli masks in distribution, about 10% of a DETR-R50 CPU training step saved.
        reuse_freed_memory: :func:`reuse_freed_host_memory` for this process (no effect off glibc).

    Returns:
        The same model.
    """
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"speed.compile_mode={compile_mode!r}: choose one of {', '.join(COMPILE_MODES)}")
    if channels_last:
        target = getattr(model, "backbone", model)
        target.to(memory_format=torch.channels_last)
        log.info("Backbone in channels_last memory format")
    if reuse_freed_memory:
        if reuse_freed_host_memory():
            log.info("Freed host memory stays in the heap for reuse (glibc mallopt)")
        else:
            log.info("speed.reuse_freed_memory: not a glibc process, left as is")
    if fast_dropout:
        changed = use_fast_dropout(model)
        log.info("Fast CPU dropout masks in %d dropout and attention modules", changed)
    if compile:
        model.compile(mode=None if compile_mode == "default" else compile_mode, dynamic=compile_dynamic)
        log.info(
            "Model compiled with torch.compile (mode %s); the first steps include compilation", compile_mode
        )
    return model


def apply_speed_config(model: nn.Module, speed: DictConfig | None) -> nn.Module:
    """:func:`apply_speed_options` with a run's ``speed`` config group (``conf/speed``); None: defaults."""
    return apply_speed_options(model, **OmegaConf.to_container(speed or OmegaConf.create(), resolve=True))
