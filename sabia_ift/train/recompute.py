"""Checkpointing that recomputes only what the backward pass reads (`gradient_checkpointing: offload`).

A checkpointed decoder layer normally runs its whole forward pass again in
backward. Two of its seven matrix products are wasted there: the output
projections of attention and of the MLP (`o_proj`, `down_proj`) feed nothing
but a residual add, and a frozen weight's input gradient needs only the weight,
not the product. Here each LLaMA decoder layer is checkpointed in two halves,
attention and MLP, whose inputs (the residual stream before and after
attention) go to CPU memory with ActivationOffload. Recomputing a half then
stops being about its output: a frozen output projection hands back an
unfilled tensor, and its backward computes the input gradient from the weight
alone. At 7B that is 30% of the recomputed products (BENCHMARKS.md). In a
SwiGLU MLP whose down projection is skipped, the activation (silu(gate) * up)
is skipped too: its backward needs only gate and up, as it always did.

With the offload, the attention kernel's output and log-sum-exp from the first
pass travel to CPU memory with the layer inputs, so the recompute skips the
attention forward too and its backward reads them (dense causal attention
without a mask on an sm90 GPU with cuDNN, or on CPU; other attention is
recomputed). At 7B on an NVIDIA H100 80GB that is 128 MiB more each way per
layer, and the 0.6 ms forward of each layer no longer runs twice. The 4-bit
weights a recompute dequantises are kept for the half's backward, which reads
them again at once (fused_lora.keep_dequantized).

Only frozen, plain (or 4-bit) projections are skipped; a LoRA-tuned one needs
its input for its own gradient and is recomputed as before. Layers of another
shape keep the Hugging Face checkpointing of the whole layer.
"""

from __future__ import annotations

import functools
import logging
import threading
import types
from typing import Any

from .fused_lora import _compute_dtype, _dense_weight, keep_dequantized

log = logging.getLogger(__name__)

TAILS = (("self_attn", "o_proj"), ("mlp", "down_proj"))
HEADS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("mlp", "gate_proj"),
         ("mlp", "up_proj"))
_state = threading.local()  # set while a half is being recomputed, in the thread that recomputes it


def _recomputing() -> bool:
    return getattr(_state, "recomputing", False)


def _frozen_input_grad(grad, base, dtype, shape, out_dtype):
    """dX = dY W of a frozen projection (4-bit or not), computed in `dtype`, returned as its input was."""
    import torch

    g = grad.reshape(-1, grad.shape[-1]).to(dtype)
    return torch.mm(g, _dense_weight(base, dtype)).view(shape).to(out_dtype)


@functools.cache
def _deferred_linear():
    """Forward: an unfilled output of the right shape. Backward: dX = dY W, the only gradient a frozen weight gives."""
    import torch

    class DeferredLinear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, base, out_dtype):
            ctx.base, ctx.dtype, ctx.x_shape, ctx.x_dtype = base, _compute_dtype(x), x.shape, x.dtype
            return x.new_empty((*x.shape[:-1], base.out_features), dtype=out_dtype)

        @staticmethod
        def backward(ctx, grad):
            return _frozen_input_grad(grad, ctx.base, ctx.dtype, ctx.x_shape, ctx.x_dtype), None, None

    return DeferredLinear


@functools.cache
def _residual_in_recompute():
    """Forward: the branch unchanged (the sum is never read in a recompute). Backward: the sum's gradient."""
    import torch

    class ResidualInRecompute(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, branch):
            return branch.view_as(branch)

        @staticmethod
        def backward(ctx, grad):
            return grad, grad

    return ResidualInRecompute


@functools.cache
def _deferred_swiglu():
    """Forward: an unfilled output of down_proj(silu(a) * b). Backward: dX through the frozen
    down projection, then the activation's own backward, from a and b alone."""
    import torch

    class DeferredSwiGLU(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b, down, liger):
            ctx.save_for_backward(a, b)
            ctx.down, ctx.liger, ctx.dtype = down, liger, _compute_dtype(a)
            out_dtype = a.dtype if getattr(down.weight, "quant_state", None) is not None else ctx.dtype
            return a.new_empty((*a.shape[:-1], down.out_features), dtype=out_dtype)

        @staticmethod
        def backward(ctx, grad):
            a, b = ctx.saved_tensors
            dh = _frozen_input_grad(grad, ctx.down, ctx.dtype, a.shape, a.dtype)
            if ctx.liger:
                # The kernel the first pass used; it writes the gradients over a and b, read by nothing else.
                from liger_kernel.ops.swiglu import swiglu_backward

                da, db = swiglu_backward(a, b, dh)
            else:
                # The ops autograd runs for act_fn(a) * b, so the numbers are those of the plain layer.
                db = dh * torch.nn.functional.silu(a)
                da = torch.ops.aten.silu_backward(dh * b, a)
            return da, db, None, None

    return DeferredSwiGLU


@functools.cache
def _kept_linear():
    """A frozen 4-bit projection in a recompute: its dequantised weight kept for its backward."""
    import torch

    class KeptLinear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, base):
            ctx.base, ctx.x_shape = base, x.shape
            x2 = x.reshape(-1, x.shape[-1])
            out = torch.mm(x2, _dense_weight(base, x.dtype, x2.shape[0]).t())
            return out.view(*x.shape[:-1], out.shape[-1])

        @staticmethod
        def backward(ctx, grad):
            return _frozen_input_grad(grad, ctx.base, grad.dtype, ctx.x_shape, grad.dtype), None

    return KeptLinear


def _head_forward(self, x, *args, **kwargs):
    """A frozen 4-bit input projection: in a recompute, one dequantisation for its forward and backward."""
    if (not _recomputing() or args or kwargs or self.bias is not None
            or not x.dtype == _compute_dtype(x) == (self.compute_dtype or x.dtype)):
        return self._sabia_forward(x, *args, **kwargs)
    return _kept_linear().apply(x, self)


def _swiglu_kind(mlp) -> str | None:
    """'liger' or 'torch' for an MLP computing down(silu(gate(x)) * up(x)); None for any other."""
    kind = type(mlp).__name__
    silu = getattr(getattr(mlp, "config", None), "hidden_act", None) in ("silu", "swish")
    if kind == "LigerSwiGLUMLP" and type(mlp).__module__.startswith("liger_kernel"):
        return "liger"
    if kind == "LlamaMLP" and type(mlp).__module__.startswith("transformers") and silu:
        return "torch"
    return None


def _mlp_forward(self, x):
    """A SwiGLU MLP with a frozen down projection: its activation and output skipped in a recompute."""
    if not _recomputing():
        return self._sabia_forward(x)
    return _deferred_swiglu().apply(self.gate_proj(x), self.up_proj(x), self.down_proj,
                                    self._sabia_swiglu == "liger")


def _add_residual(x, branch):
    # A recomputed half's output only carries the graph back to its input: skip the add.
    return _residual_in_recompute().apply(x, branch) if _recomputing() else x + branch


def _tail_forward(self, x, *args, **kwargs):
    """A frozen output projection: skipped while its half is recomputed, itself otherwise."""
    if not _recomputing() or args or kwargs:
        return self._sabia_forward(x, *args, **kwargs)
    quantized = getattr(self.weight, "quant_state", None) is not None
    # The dtype its real forward returns: bitsandbytes gives the input's, a Linear the autocast one.
    out_dtype = x.dtype if quantized else _compute_dtype(x)
    return _deferred_linear().apply(x, self, out_dtype)


def _run_half(function, x):
    import torch

    # The first pass runs without grad inside the checkpoint; the recompute runs with it.
    _state.recomputing = torch.is_grad_enabled()
    _state.half = True
    # A recompute dequantises the half's 4-bit weights; its backward, which follows at
    # once, reads them again (one half's weights kept: up to 172 MiB at 7B, where the
    # micro-batch is large enough; fused_lora._dense_weight).
    keep_dequantized(_state.recomputing)
    try:
        return function(x)
    finally:
        _state.recomputing = _state.half = False
        keep_dequantized(False)


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


def saved_causal_attention(module, q, k, v, scale):
    """Causal attention of (batch, heads, tokens, dim) q, k, v inside a split half: the
    first pass stashes its output and log-sum-exp, the recompute reuses them.

    None where it does not apply (outside a half, grouped or cross attention, no
    kernel for the device); the caller then runs its own attention.
    """
    slot = getattr(module, "_sabia_attention", None)
    if slot is None or not getattr(_state, "half", False):
        return None
    if q.shape[1] != k.shape[1] or q.shape[2] != k.shape[2] or q.shape[2] < 2:
        return None
    ops = _attention_ops(q)
    if ops is None:
        return None
    forward, backward = ops
    offload = slot["offload"]
    if not _recomputing():
        out, lse, aux = forward(q, k, v, scale)
        # Sent in the (batch, tokens, heads, dim) order the kernel wrote: the copy keeps it.
        slot["saved"] = (offload.stash(out.transpose(1, 2)), offload.stash(lse), aux)
        return out
    saved, slot["saved"] = slot.get("saved"), None
    if saved is None:
        raise RuntimeError(f"{module.__class__.__name__}: recompute without a first pass's attention output")
    out_handle, lse_handle, aux = saved
    lse = offload.fetch(lse_handle)  # the small one first: backward takes items in reverse
    out = offload.fetch(out_handle).transpose(1, 2)
    return _attention_from_saved().apply(q, k, v, out, lse, aux, scale, backward)


def _split_forward(self, hidden_states, *args, **kwargs):
    """A LLaMA decoder layer as two checkpointed halves; the layer's own forward when not training."""
    import torch
    from torch.utils.checkpoint import checkpoint

    if args or not (self.training and torch.is_grad_enabled()):
        return self._sabia_forward(hidden_states, *args, **kwargs)

    def attention(x):
        out, _ = self.self_attn(hidden_states=self.input_layernorm(x), **kwargs)
        return _add_residual(x, out)

    def mlp(h):
        return _add_residual(h, self.mlp(self.post_attention_layernorm(h)))

    # Reentrant: the only tensors it saves are each half's input, which ActivationOffload moves.
    middle = checkpoint(_run_half, attention, hidden_states, use_reentrant=True)
    return checkpoint(_run_half, mlp, middle, use_reentrant=True)


def _is_frozen_linear(module) -> bool:
    import torch

    bnb_4bit = type(module).__module__.startswith("bitsandbytes") and type(module).__name__ == "Linear4bit"
    return (type(module) is torch.nn.Linear or bnb_4bit) and not any(p.requires_grad for p in module.parameters())


def _splittable(layer) -> bool:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return isinstance(layer, LlamaDecoderLayer)


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


def _use_saved_sdpa(base) -> None:
    """Switch a model on transformers' SDPA to the same attention that can reuse its first pass."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if base.config._attn_implementation != "sdpa":
        return
    AttentionInterface.register(SAVED_SDPA, _sdpa_or_saved)
    AttentionMaskInterface.register(SAVED_SDPA, sdpa_mask)
    base.set_attn_implementation(SAVED_SDPA)


def split_checkpointing(model, offload=None) -> tuple[int, int]:
    """Checkpoint every LLaMA decoder layer of a (peft) causal LM in two halves that
    skip their frozen output projections (and a SwiGLU activation feeding one)
    when recomputed; call after LoRA is attached. With `offload` (a
    kernels.ActivationOffload), attention outputs travel with it and the
    attention forward is skipped in the recompute too.

    Returns (layers split, projections skipped in recompute). Other layers are
    checkpointed whole by transformers.
    """
    base: Any = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = list(base.model.layers)
    split = [layer for layer in layers if _splittable(layer)]
    if len(split) != len(layers):
        log.info("split checkpointing: %d of %d layers are not LLaMA decoder layers and are checkpointed whole",
                 len(layers) - len(split), len(layers))
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    if offload is not None:  # without it the saved outputs would stay in GPU memory
        _use_saved_sdpa(base)
    skipped = 0
    for layer in split:
        layer.gradient_checkpointing = False  # the halves checkpoint themselves
        if offload is not None:
            layer.self_attn._sabia_attention = {"offload": offload}
        layer._sabia_forward = layer.forward
        layer.forward = types.MethodType(_split_forward, layer)
        for parent, name in TAILS:
            tail = getattr(getattr(layer, parent), name, None)
            if tail is not None and _is_frozen_linear(tail):
                tail._sabia_forward = tail.forward
                tail.forward = types.MethodType(_tail_forward, tail)
                skipped += 1
        for parent, name in HEADS:
            head: Any = getattr(getattr(layer, parent), name, None)
            head = head.get_base_layer() if hasattr(head, "get_base_layer") else head
            if (head is not None and _is_frozen_linear(head) and not hasattr(head, "_sabia_forward")
                    and getattr(head.weight, "quant_state", None) is not None):
                head._sabia_forward = head.forward
                head.forward = types.MethodType(_head_forward, head)
        kind = _swiglu_kind(layer.mlp)
        if kind is not None and hasattr(layer.mlp.down_proj, "_sabia_forward"):
            layer.mlp._sabia_forward, layer.mlp._sabia_swiglu = layer.mlp.forward, kind
            layer.mlp.forward = types.MethodType(_mlp_forward, layer.mlp)
    log.info("split checkpointing: %d layers in two halves, %d frozen output projections not recomputed",
             len(split), skipped)
    return len(split), skipped
