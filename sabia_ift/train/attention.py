"""Attention for the train stage: varlen attention for packed rows, and causal attention
whose first pass the layer recompute (recompute.py) reuses instead of running again.

The kernels are PyTorch's (varlen flash, cuDNN, SDPA); this module plugs them
into transformers' attention interface.
"""

from __future__ import annotations

import functools
import inspect

from ..errors import ConfigError

VARLEN = "sabia_varlen"


def _packed_rows(query, key, value, kwargs):
    """(tokens, heads, dim) views of transformers' (1, heads, tokens, dim) and the row boundaries."""
    import torch

    # squeeze, not [0]: the backward of a select writes a zero tensor and copies into it,
    # a full pass over q, k and v per layer (2.5% of a step at 7B); a squeeze's is a view.
    q, k, v = (t.squeeze(0).transpose(0, 1) for t in (query, key, value))
    if k.shape[1] != q.shape[1]:  # grouped-query attention: repeat K/V heads
        repeat = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    cu_q = kwargs["cu_seq_lens_q"].to(device=q.device, dtype=torch.int32)
    cu_k = kwargs.get("cu_seq_lens_k", cu_q).to(device=q.device, dtype=torch.int32)
    return q, k, v, cu_q, cu_k, int(kwargs["max_length_q"]), int(kwargs["max_length_k"])


def _equal_rows_attention(module, q, k, v, rows: int, length: int, scaling):
    """Rows of one length are a dense batch: SDPA, preferring cuDNN's attention.

    On an NVIDIA H100 80GB, cuDNN's kernel takes 2.7 ms forward and backward
    for 8 x 2,048 tokens against 5.0 ms for the varlen flash kernel
    (bench/attention_backends.py). Its ragged-row variant gave wrong gradients
    in PyTorch 2.11, so rows of mixed lengths stay on the varlen kernel.
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    tokens, heads, dim = q.shape
    qb, kb, vb = (t.reshape(rows, length, heads, dim).transpose(1, 2) for t in (q, k, v))
    out = saved_causal_attention(module, qb, kb, vb, scaling)  # None outside a checkpointed half
    if out is not None:
        return out.transpose(1, 2).reshape(1, tokens, heads, dim)
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.MATH]
    with sdpa_kernel(order, set_priority=True):
        out = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scaling)
    return out.transpose(1, 2).reshape(1, tokens, heads, dim)


def _varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal attention inside each packed row only, through PyTorch's varlen flash kernel.

    transformers hands over (batch=1, heads, tokens, dim) and the row boundaries
    the flattening collator computed (cu_seq_lens_*). Without them (a padded
    batch, generation) it falls back to SDPA.
    """
    if kwargs.get("cu_seq_lens_q") is None or query.shape[0] != 1:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    q, k, v, cu_q, cu_k, max_q, max_k = _packed_rows(query, key, value, kwargs)
    rows = cu_q.numel() - 1
    # Every row is at most max_q long, so they all are exactly that when they fill the batch
    # (known from shapes alone: no GPU synchronisation).
    if max_q * rows == q.shape[0] and max_k == max_q and k.shape[0] == q.shape[0]:
        return _equal_rows_attention(module, q, k, v, rows, max_q, scaling), None
    from torch.nn.attention.varlen import varlen_attn

    out = varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scaling, **_CAUSAL)
    return out.unsqueeze(0), None


def _causal_kwargs() -> dict:
    """torch 2.11 spells causal `is_causal=True`; later versions `window_size=(-1, 0)`."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return {}
    params = inspect.signature(varlen_attn).parameters
    return {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}


_CAUSAL: dict = {}


def register_varlen_attention() -> str:
    """Register the varlen attention with transformers; returns its attn_implementation name."""
    try:
        from torch.nn.attention import varlen  # noqa: F401
    except ImportError:
        raise ConfigError("train.attention: varlen needs torch.nn.attention.varlen (PyTorch 2.10 or later)") from None
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    _CAUSAL.update(_causal_kwargs())
    AttentionInterface.register(VARLEN, _varlen_attention)
    # Like flash attention: no dense mask; row boundaries come as cu_seq_lens.
    AttentionMaskInterface.register(VARLEN, flash_attention_mask)
    return VARLEN


def attention_implementation(requested: str, packing: bool, device: str) -> str:
    """`auto`: varlen flash attention for packed rows on CUDA, SDPA otherwise.

    SDPA handles packed rows too (transformers turns the restarting position
    ids into a block-diagonal mask), but computes the masked blocks as well;
    the varlen kernel skips them.
    """
    if requested == "varlen":
        if device != "cuda" or not packing:
            raise ConfigError("train.attention: varlen runs on CUDA with train.packing: true; use auto or sdpa")
        return register_varlen_attention()
    if requested == "auto" and packing and device == "cuda":
        return register_varlen_attention()
    return "sdpa"


def _attention_ops(q):
    """(forward, backward) of a dense causal attention that returns its log-sum-exp; None where not built."""
    import torch

    if q.device.type == "cpu":
        return _cpu_attention_forward, _cpu_attention_backward
    # cuDNN's kernel, the one SDPA picks on these cards; elsewhere SDPA is left to choose.
    if (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] <= 128 and q.shape[-1] % 8 == 0
            and torch.backends.cuda.cudnn_sdp_enabled() and _sm90_or_later(q.device.index)):
        return _cudnn_attention_forward, _cudnn_attention_backward
    return None


@functools.cache
def _sm90_or_later(device_index: int | None) -> bool:
    """Asked once per card rather than on every layer's attention call."""
    import torch

    return torch.cuda.get_device_capability(device_index) >= (9, 0)


def _cpu_attention_forward(q, k, v, scale):
    import torch

    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
    return out, lse, ()


def _cpu_attention_backward(grad, q, k, v, out, lse, aux, scale):
    import torch

    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad, q, k, v, out, lse, 0.0, True, scale=scale)


def _cudnn_attention_forward(q, k, v, scale):
    import torch

    out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, True, False, scale=scale)
    return out, lse, (seed, offset, cum_q, cum_k, max_q, max_k)


def _cudnn_attention_backward(grad, q, k, v, out, lse, aux, scale):
    import torch

    seed, offset, cum_q, cum_k, max_q, max_k = aux
    # The kernel reads the output gradient in the output's layout.
    grad = grad if grad.stride() == out.stride() else torch.empty_like(out).copy_(grad)
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        grad, q, k, v, out, lse, seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, True, scale=scale)


@functools.cache
def _attention_from_saved():
    """Forward: the first pass's attention output, handed back. Backward: the kernel's backward from it."""
    import torch

    class AttentionFromSaved(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, out, lse, aux, scale, backward):
            ctx.save_for_backward(q, k, v, out, lse)
            ctx.aux, ctx.scale, ctx.backward_op = aux, scale, backward
            return out.view_as(out)

        @staticmethod
        def backward(ctx, grad):
            q, k, v, out, lse = ctx.saved_tensors
            dq, dk, dv = ctx.backward_op(grad, q, k, v, out, lse, ctx.aux, ctx.scale)
            return dq, dk, dv, None, None, None, None, None

    return AttentionFromSaved


class SavedAttention:
    """One attention module's link to the layer recompute: the first pass of a checkpointed
    half stashes the kernel's output and log-sum-exp on `offload`, the recompute takes them
    back. `phase` (recompute.Phase) says whether a half is running and whether it is the
    recompute."""

    def __init__(self, offload, phase) -> None:
        self.offload, self.phase = offload, phase
        self.saved: tuple | None = None

    def attach(self, module) -> None:
        # transformers hands an attention function the module alone: the module carries the link.
        module.sabia_saved_attention = self

    def __call__(self, module, q, k, v, scale):
        if not self.phase.in_half():
            return None
        if q.shape[1] != k.shape[1] or q.shape[2] != k.shape[2] or q.shape[2] < 2:
            return None
        ops = _attention_ops(q)
        if ops is None:
            return None
        forward, backward = ops
        if not self.phase.recomputing():
            out, lse, aux = forward(q, k, v, scale)
            # Sent in the (batch, tokens, heads, dim) order the kernel wrote: the copy keeps it.
            self.saved = (self.offload.stash(out.transpose(1, 2)), self.offload.stash(lse), aux)
            return out
        saved, self.saved = self.saved, None
        if saved is None:
            raise RuntimeError(f"{module.__class__.__name__}: recompute without a first pass's attention output")
        out_handle, lse_handle, aux = saved
        lse = self.offload.fetch(lse_handle)  # the small one first: backward takes items in reverse
        out = self.offload.fetch(out_handle).transpose(1, 2)
        return _attention_from_saved().apply(q, k, v, out, lse, aux, scale, backward)


def saved_causal_attention(module, q, k, v, scale):
    """Causal attention of (batch, heads, tokens, dim) q, k, v inside a split half: the
    first pass stashes its output and log-sum-exp, the recompute reuses them.

    None where it does not apply (no SavedAttention on the module, outside a half,
    grouped or cross attention, no kernel for the device); the caller then runs its
    own attention.
    """
    link = getattr(module, "sabia_saved_attention", None)
    return None if link is None else link(module, q, k, v, scale)


SAVED_SDPA = "sabia_sdpa_saved"


def _sdpa_or_saved(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' SDPA attention, but causal attention without a mask inside a split half reuses its first pass."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plain = (attention_mask is None and not dropout and kwargs.get("is_causal", True) is not False
             and getattr(module, "is_causal", True) and not any(kwargs.get(k) is not None
                                                                for k in ("position_bias", "softcap", "sinks")))
    out = saved_causal_attention(module, query, key, value, scaling) if plain else None
    if out is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return out.transpose(1, 2).contiguous(), None


def use_saved_sdpa(base) -> None:
    """Switch a model on transformers' SDPA to the same attention that can reuse its first pass."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if base.config._attn_implementation != "sdpa":
        return
    AttentionInterface.register(SAVED_SDPA, _sdpa_or_saved)
    AttentionMaskInterface.register(SAVED_SDPA, sdpa_mask)
    base.set_attn_implementation(SAVED_SDPA)
