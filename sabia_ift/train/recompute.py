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
them again at once (weights.KeptWeights). The attention reuse itself lives in
attention.py (SavedAttention); this module tells it, through a Phase, which
pass is running.

Only frozen, plain (or 4-bit) projections are skipped; a LoRA-tuned one needs
its input for its own gradient and is recomputed as before. Layers of another
shape keep the Hugging Face checkpointing of the whole layer.
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any

from .attention import SavedAttention, use_saved_sdpa
from .kernels import swiglu_grads, swiglu_kind
from .weights import KEPT, compute_dtype, forward_dtype

log = logging.getLogger(__name__)

TAILS = (("self_attn", "o_proj"), ("mlp", "down_proj"))
HEADS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("mlp", "gate_proj"),
         ("mlp", "up_proj"))


class Phase:
    """Where this thread is: inside a checkpointed half or not, and in its first pass or its
    recompute. Per thread: autograd runs backward (and so the recompute) in its own."""

    def __init__(self) -> None:
        self._local = threading.local()

    def in_half(self) -> bool:
        return getattr(self._local, "half", False)

    def recomputing(self) -> bool:
        return getattr(self._local, "recomputing", False)

    def run_half(self, function, x):
        import torch

        # The first pass runs without grad inside the checkpoint; the recompute runs with it.
        self._local.recomputing = torch.is_grad_enabled()
        self._local.half = True
        # A recompute dequantises the half's 4-bit weights; its backward, which follows at
        # once, reads them again (one half's weights kept: up to 172 MiB at 7B, where the
        # micro-batch is large enough; weights.KeptWeights).
        KEPT.keep(self._local.recomputing)
        try:
            return function(x)
        finally:
            self._local.recomputing = self._local.half = False
            KEPT.keep(False)


def _frozen_input_grad(grad, base, dtype, shape, out_dtype):
    """dX = dY W of a frozen projection (4-bit or not), computed in `dtype`, returned as its input was."""
    import torch

    g = grad.reshape(-1, grad.shape[-1]).to(dtype)
    return torch.mm(g, KEPT.dense(base, dtype)).view(shape).to(out_dtype)


@functools.cache
def _deferred_linear():
    """Forward: an unfilled output of the right shape. Backward: dX = dY W, the only gradient a frozen weight gives."""
    import torch

    class DeferredLinear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, base, out_dtype):
            ctx.base, ctx.dtype, ctx.x_shape, ctx.x_dtype = base, compute_dtype(x), x.shape, x.dtype
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
            ctx.down, ctx.liger, ctx.dtype = down, liger, compute_dtype(a)
            out_dtype = a.dtype if getattr(down.weight, "quant_state", None) is not None else ctx.dtype
            return a.new_empty((*a.shape[:-1], down.out_features), dtype=out_dtype)

        @staticmethod
        def backward(ctx, grad):
            a, b = ctx.saved_tensors
            dh = _frozen_input_grad(grad, ctx.down, ctx.dtype, a.shape, a.dtype)
            # The kernel the first pass used, so the numbers are those of the plain layer.
            da, db = swiglu_grads(a, b, dh, ctx.liger)
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
            out = torch.mm(x2, KEPT.dense(base, x.dtype, x2.shape[0]).t())
            return out.view(*x.shape[:-1], out.shape[-1])

        @staticmethod
        def backward(ctx, grad):
            return _frozen_input_grad(grad, ctx.base, grad.dtype, ctx.x_shape, grad.dtype), None

    return KeptLinear


def _head_forward(phase: Phase, self, x, *args, **kwargs):
    """A frozen 4-bit input projection: in a recompute, one dequantisation for its forward and backward."""
    if (not phase.recomputing() or args or kwargs or self.bias is not None
            or not x.dtype == compute_dtype(x) == (self.compute_dtype or x.dtype)):
        return self._sabia_forward(x, *args, **kwargs)
    return _kept_linear().apply(x, self)


def _mlp_forward(phase: Phase, liger: bool, self, x):
    """A SwiGLU MLP with a frozen down projection: its activation and output skipped in a recompute."""
    if not phase.recomputing():
        return self._sabia_forward(x)
    return _deferred_swiglu().apply(self.gate_proj(x), self.up_proj(x), self.down_proj, liger)


def _add_residual(phase: Phase, x, branch):
    # A recomputed half's output only carries the graph back to its input: skip the add.
    return _residual_in_recompute().apply(x, branch) if phase.recomputing() else x + branch


def _tail_forward(phase: Phase, self, x, *args, **kwargs):
    """A frozen output projection: skipped while its half is recomputed, itself otherwise."""
    if not phase.recomputing() or args or kwargs:
        return self._sabia_forward(x, *args, **kwargs)
    return _deferred_linear().apply(x, self, forward_dtype(self, x))


def _split_forward(phase: Phase, self, hidden_states, *args, **kwargs):
    """A LLaMA decoder layer as two checkpointed halves; the layer's own forward when not training."""
    import torch
    from torch.utils.checkpoint import checkpoint

    if args or not (self.training and torch.is_grad_enabled()):
        return self._sabia_forward(hidden_states, *args, **kwargs)

    def attention(x):
        out, _ = self.self_attn(hidden_states=self.input_layernorm(x), **kwargs)
        return _add_residual(phase, x, out)

    def mlp(h):
        return _add_residual(phase, h, self.mlp(self.post_attention_layernorm(h)))

    # Reentrant: the only tensors it saves are each half's input, which ActivationOffload moves.
    middle = checkpoint(phase.run_half, attention, hidden_states, use_reentrant=True)
    return checkpoint(phase.run_half, mlp, middle, use_reentrant=True)


def _is_frozen_linear(module) -> bool:
    import torch

    bnb_4bit = type(module).__module__.startswith("bitsandbytes") and type(module).__name__ == "Linear4bit"
    return (type(module) is torch.nn.Linear or bnb_4bit) and not any(p.requires_grad for p in module.parameters())


def _splittable(layer) -> bool:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return isinstance(layer, LlamaDecoderLayer)


def split_checkpointing(model, offload=None) -> tuple[int, int]:
    """Checkpoint every LLaMA decoder layer of a (peft) causal LM in two halves that
    skip their frozen output projections (and a SwiGLU activation feeding one)
    when recomputed; call after LoRA is attached. With `offload` (a
    offload.ActivationOffload), attention outputs travel with it and the
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
        use_saved_sdpa(base)
    phase, skipped, intercepted = Phase(), 0, set[int]()

    def intercept(module, forward, *bound) -> None:
        # The module's own forward stays reachable as `_sabia_forward`; the new one gets this
        # model's Phase (and anything else it needs) bound, not looked up in a global.
        module._sabia_forward = module.forward
        module.forward = functools.partial(forward, *bound, module)
        intercepted.add(id(module))

    for layer in split:
        layer.gradient_checkpointing = False  # the halves checkpoint themselves
        if offload is not None:
            SavedAttention(offload, phase).attach(layer.self_attn)
        intercept(layer, _split_forward, phase)
        for parent, name in TAILS:
            tail = getattr(getattr(layer, parent), name, None)
            if tail is not None and _is_frozen_linear(tail):
                intercept(tail, _tail_forward, phase)
                skipped += 1
        for parent, name in HEADS:
            head: Any = getattr(getattr(layer, parent), name, None)
            head = head.get_base_layer() if hasattr(head, "get_base_layer") else head
            if (head is not None and _is_frozen_linear(head) and id(head) not in intercepted
                    and getattr(head.weight, "quant_state", None) is not None):
                intercept(head, _head_forward, phase)
        kind = swiglu_kind(layer.mlp)
        if kind is not None and id(layer.mlp.down_proj) in intercepted:
            intercept(layer.mlp, _mlp_forward, phase, kind == "liger")
    log.info("split checkpointing: %d layers in two halves, %d frozen output projections not recomputed",
             len(split), skipped)
    return len(split), skipped
