"""Faster kernels for the train stage: varlen attention for packed rows, Liger Kernel, activation offload.

Everything here comes from maintained libraries (PyTorch's varlen flash
attention, Liger Kernel); this module only plugs them into transformers.
"""

from __future__ import annotations

import contextlib
import inspect
import logging

from ..errors import ConfigError

log = logging.getLogger(__name__)

VARLEN = "sabia_varlen"


def _varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal attention inside each packed row only, through PyTorch's varlen flash kernel.

    transformers hands over (batch=1, heads, tokens, dim) and the row boundaries
    the flattening collator computed (cu_seq_lens_*). Without them (a padded
    batch, generation) it falls back to SDPA.
    """
    import torch
    from torch.nn.attention.varlen import varlen_attn
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_q = kwargs.get("cu_seq_lens_q")
    if cu_q is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, dim)
    if k.shape[1] != q.shape[1]:  # grouped-query attention: repeat K/V heads
        repeat = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    cu_q = cu_q.to(device=q.device, dtype=torch.int32)
    cu_k = kwargs.get("cu_seq_lens_k", cu_q).to(device=q.device, dtype=torch.int32)
    out = varlen_attn(q, k, v, cu_q, cu_k, int(kwargs["max_length_q"]), int(kwargs["max_length_k"]),
                      scale=scaling, **_CAUSAL)
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


def apply_liger(device: str) -> None:
    """Liger Kernel's fused RMSNorm, RoPE, SwiGLU and linear cross-entropy for LLaMA models.

    Must run before the model is built: it swaps the modules' classes in
    transformers' LLaMA code. The fused cross-entropy never materialises the
    32k-vocabulary logits of a whole micro-batch.
    """
    if device != "cuda":
        raise ConfigError("train.kernels: liger needs a CUDA GPU (its kernels are Triton); set it to none on CPU")
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
    except ImportError as exc:
        raise ConfigError(f"train.kernels: liger needs the liger-kernel package ({exc}); "
                          "pip install liger-kernel, or set train.kernels: none") from None
    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=True)
    log.info("Liger Kernel: fused RMSNorm, RoPE, SwiGLU and linear cross-entropy")


class ActivationOffload:
    """Checkpointed layer inputs go to pinned CPU memory during the forward pass and
    come back for the backward pass, so GPU memory no longer grows with the
    number of layers times the micro-batch.

    Used with reentrant checkpointing, whose only saved tensors are each
    layer's inputs: a saved-tensor hook moves exactly those. The copies are
    queued on the compute stream without blocking the host.
    """

    def __init__(self) -> None:
        import torch

        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    @staticmethod
    def _pack(tensor):
        import torch

        if not tensor.is_cuda or tensor.numel() < 1 << 16:
            return tensor
        cpu = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=True)
        cpu.copy_(tensor, non_blocking=True)
        return tensor.device, cpu

    @staticmethod
    def _unpack(packed):
        if isinstance(packed, tuple):
            device, cpu = packed
            return cpu.to(device, non_blocking=True)
        return packed

    def attach(self, decoder) -> None:
        """Offload for the duration of the decoder stack's forward pass."""
        stack = contextlib.ExitStack()

        def enter(module, args, kwargs):
            if module.training:
                stack.enter_context(self._hooks)

        def leave(module, args, kwargs, output):
            stack.close()

        decoder.register_forward_pre_hook(enter, with_kwargs=True)
        decoder.register_forward_hook(leave, with_kwargs=True)
