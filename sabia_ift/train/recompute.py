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

from .fused_lora import _compute_dtype, _dense_weight

log = logging.getLogger(__name__)

TAILS = (("self_attn", "o_proj"), ("mlp", "down_proj"))
_state = threading.local()  # set while a half is being recomputed, in the thread that recomputes it


def _recomputing() -> bool:
    return getattr(_state, "recomputing", False)


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
            g = grad.reshape(-1, grad.shape[-1]).to(ctx.dtype)
            dx = torch.mm(g, _dense_weight(ctx.base, ctx.dtype))
            return dx.view(ctx.x_shape).to(ctx.x_dtype), None, None

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
            g = grad.reshape(-1, grad.shape[-1]).to(ctx.dtype)
            dh = torch.mm(g, _dense_weight(ctx.down, ctx.dtype)).view(a.shape).to(a.dtype)
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
    try:
        return function(x)
    finally:
        _state.recomputing = False


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


def split_checkpointing(model) -> tuple[int, int]:
    """Checkpoint every LLaMA decoder layer of a (peft) causal LM in two halves that
    skip their frozen output projections (and a SwiGLU activation feeding one)
    when recomputed; call after LoRA is attached.

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
    skipped = 0
    for layer in split:
        layer.gradient_checkpointing = False  # the halves checkpoint themselves
        layer._sabia_forward = layer.forward
        layer.forward = types.MethodType(_split_forward, layer)
        for parent, name in TAILS:
            tail = getattr(getattr(layer, parent), name, None)
            if tail is not None and _is_frozen_linear(tail):
                tail._sabia_forward = tail.forward
                tail.forward = types.MethodType(_tail_forward, tail)
                skipped += 1
        kind = _swiglu_kind(layer.mlp)
        if kind is not None and hasattr(layer.mlp.down_proj, "_sabia_forward"):
            layer.mlp._sabia_forward, layer.mlp._sabia_swiglu = layer.mlp.forward, kind
            layer.mlp.forward = types.MethodType(_mlp_forward, layer.mlp)
    log.info("split checkpointing: %d layers in two halves, %d frozen output projections not recomputed",
             len(split), skipped)
    return len(split), skipped
