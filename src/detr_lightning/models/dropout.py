"""Dropout with CPU masks drawn from NumPy's PCG64: same Bernoulli masks, about 6x cheaper to draw.

On a CPU, PyTorch draws every dropout mask element by element from its Mersenne-Twister generator on
one thread (``aten::bernoulli_``). In the DETR-R50 training step that is about 30 million draws, 10%
of the whole step on 2 cores (BENCHMARKS.md). Here a mask is drawn in one call from NumPy's PCG64
generator, 16 random bits per element, seeded from PyTorch's default generator at each call, so
``torch.manual_seed`` / ``seed_everything`` still make runs reproducible.

What changes against ``nn.Dropout``: the random stream (the masks have the same distribution, not the
same values), and the drop probability is rounded to a multiple of 1/65536 (0.1 becomes 0.100006).
The backward pass, the ``1 / (1 - p)`` scaling and the bool mask kept for backward are PyTorch's own
(``aten::native_dropout_backward``). On other devices, in eval mode, inside ``torch.compile`` and for
``p`` of 0 or 1, PyTorch's dropout runs unchanged.

Switched on for a model by :func:`use_fast_dropout` (``speed.fast_dropout=true``): it turns the
model's ``nn.Dropout`` and ``nn.MultiheadAttention`` modules into the subclasses below, which have no
new parameters or buffers, so checkpoints keep their keys.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

MASK_BITS = 16
_MASK_LEVELS = 1 << MASK_BITS


def keep_mask(shape: torch.Size | tuple[int, ...], drop_probability: float) -> Tensor:
    """A bool CPU tensor of ``shape``, each element True (kept) with probability ``1 - p``.

    ``p`` is rounded to the nearest multiple of 1/65536. The PCG64 seed is drawn from PyTorch's default
    CPU generator.
    """
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    threshold = round(drop_probability * _MASK_LEVELS)
    bits = np.random.Generator(np.random.PCG64(seed)).integers(
        0, _MASK_LEVELS, size=int(np.prod(shape, dtype=np.int64)), dtype=np.uint16
    )
    return torch.from_numpy(np.greater_equal(bits, threshold)).view(shape)


class _ApplyKeepMask(torch.autograd.Function):
    """``x * mask / (1 - p)`` whose backward keeps only the bool mask (as PyTorch's dropout does)."""

    @staticmethod
    def forward(ctx, x: Tensor, mask: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return torch.ops.aten.native_dropout_backward(x, mask, scale)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return torch.ops.aten.native_dropout_backward(grad, mask, ctx.scale), None, None


def takes_fast_path(x: Tensor, p: float, training: bool) -> bool:
    """Whether :func:`fast_dropout` draws its own mask for ``x`` (else PyTorch's dropout runs)."""
    return (
        training
        and 0.0 < p < 1.0
        and x.device.type == "cpu"
        and x.is_floating_point()
        and not torch.compiler.is_compiling()
    )


def fast_dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """``F.dropout(x, p, training)`` with the mask from :func:`keep_mask` on the fast path; any shape."""
    if not takes_fast_path(x, p, training):
        return F.dropout(x, p, training)
    return _ApplyKeepMask.apply(x, keep_mask(x.shape, p), 1.0 / (1.0 - p))


class FastDropout(nn.Dropout):
    """``nn.Dropout`` drawing its CPU masks with :func:`keep_mask` (``inplace`` falls back to PyTorch)."""

    def forward(self, input: Tensor) -> Tensor:
        if self.inplace:
            return super().forward(input)
        return fast_dropout(input, self.p, self.training)


class FastDropoutMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose attention-weight dropout draws its CPU masks with :func:`keep_mask`.

    In training on a CPU with ``dropout > 0`` and no weights asked for, attention runs explicitly
    (what PyTorch's scaled-dot-product "math" kernel does on a CPU whenever dropout is on):
    ``softmax(q k^T / sqrt(d) + bias)``, dropout, ``@ v``, output projection. Every other case, and any
    layout this path does not cover (``batch_first``, separate q/k/v projections, ``add_bias_kv``,
    ``add_zero_attn``), is ``nn.MultiheadAttention.forward``.
    """

    def _explicit_path(self, query: Tensor, need_weights: bool) -> bool:
        return (
            not need_weights
            and takes_fast_path(query, self.dropout, self.training)
            and self._qkv_same_embed_dim
            and not self.batch_first
            and self.bias_k is None
            and not self.add_zero_attn
        )

    def forward(  # type: ignore[override]
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if is_causal or query.dim() != 3 or not self._explicit_path(query, need_weights):
            return super().forward(
                query,
                key,
                value,
                key_padding_mask=key_padding_mask,
                need_weights=need_weights,
                attn_mask=attn_mask,
                average_attn_weights=average_attn_weights,
                is_causal=is_causal,
            )
        return self._attend_with_fast_dropout(query, key, value, key_padding_mask, attn_mask), None

    def _attend_with_fast_dropout(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None,
        attn_mask: Tensor | None,
    ) -> Tensor:
        """``query (L, B, D)``, ``key``/``value (S, B, D)``, ``key_padding_mask (B, S)`` (True or -inf
        = ignored), ``attn_mask (L, S)`` or ``(B * H, L, S)`` (bool True = blocked, or float added)
        -> ``(L, B, D)``."""
        length, batch, width = query.shape
        source = key.shape[0]
        heads = self.num_heads
        head_width = width // heads
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3

        def split_heads(x: Tensor, tokens: int) -> Tensor:  # (T, B, D) -> (B * H, T, D / H)
            return x.reshape(tokens, batch * heads, head_width).transpose(0, 1)

        q = split_heads(F.linear(query, w_q, b_q), length) * head_width**-0.5
        k = split_heads(F.linear(key, w_k, b_k), source)
        v = split_heads(F.linear(value, w_v, b_v), source)
        logits = torch.bmm(q, k.transpose(1, 2))  # (B * H, L, S)
        bias = self._logit_bias(key_padding_mask, attn_mask, batch, length, source, q.dtype)
        if bias is not None:  # added per image and head by broadcasting, never expanded to (B * H, L, S)
            logits = logits.view(batch, heads, length, source).add_(bias).view(batch * heads, length, source)
        weights = fast_dropout(torch.softmax(logits, dim=-1), self.dropout, True)
        attended = torch.bmm(weights, v).transpose(0, 1).reshape(length, batch, width)
        return F.linear(attended, self.out_proj.weight, self.out_proj.bias)

    def _logit_bias(
        self,
        key_padding_mask: Tensor | None,
        attn_mask: Tensor | None,
        batch: int,
        length: int,
        source: int,
        dtype: torch.dtype,
    ) -> Tensor | None:
        """Both masks as one float bias broadcastable to ``(B, H, L, S)`` (``-inf`` where blocked)."""

        def as_bias(mask: Tensor) -> Tensor:
            if mask.dtype == torch.bool:
                return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
                    mask, float("-inf")
                )
            return mask.to(dtype)

        bias = None
        if attn_mask is not None:
            bias = as_bias(attn_mask)
            bias = (
                bias.view(1, 1, length, source) if bias.dim() == 2 else bias.view(batch, -1, length, source)
            )
        if key_padding_mask is not None:
            padding = as_bias(key_padding_mask).view(batch, 1, 1, source)
            bias = padding if bias is None else bias + padding
        return bias


def use_fast_dropout(model: nn.Module) -> int:
    """Turn every ``nn.Dropout`` and ``nn.MultiheadAttention`` of ``model`` into the fast-mask classes.

    In place; parameters, buffers and state-dict keys are unchanged. Returns how many modules changed.
    """
    changed = 0
    for module in model.modules():
        if type(module) is nn.Dropout:
            module.__class__ = FastDropout
            changed += 1
        elif type(module) is nn.MultiheadAttention:
            module.__class__ = FastDropoutMultiheadAttention
            changed += 1
    return changed
