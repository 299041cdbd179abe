"""LoRA projections as one autograd function: base matmul and adapter in two GEMMs each way.

peft's LoRA forward computes the frozen projection, copies it ("defensive
clone" for 4-bit), computes B(A(x)), scales it in a separate pass and adds it in
another; autograd then sums the input gradients of the two branches in yet
another pass. At 7B those passes over (tokens x 4,096) activations cost about
as much as the attention. Here the adapter is added inside the output GEMM
(`addmm_`), the backward adds its input gradient inside the dX GEMM, and the
frozen weight (4-bit or not) is dequantised once per pass, as bitsandbytes does.

Numerically the same LoRA: the tests compare outputs and gradients with peft's
own forward. The adapter weights stay in their own dtype (fp32 master weights
under bf16 autocast); only their bf16 copies enter the GEMMs, as under autocast.
"""

from __future__ import annotations

import functools
import logging
import threading
import types
from typing import Any

log = logging.getLogger(__name__)
# 4-bit weights dequantised while a checkpointed half is recomputed, read again by its backward
# (recompute.py); per thread, as autograd runs backward (and so the recompute) in its own.
_dequantized = threading.local()


def keep_dequantized(fill: bool) -> None:
    """fill=True: forget the kept weights and keep each one dequantised from now on;
    fill=False: stop adding, but hand out those kept (until the next fill=True)."""
    if fill:
        _dequantized.weights = {}
    _dequantized.fill = fill


def _dense_weight(base, dtype, tokens: int = 0):
    """The frozen weight as a (out, in) matrix in the compute dtype; dequantised when 4-bit.

    While keep_dequantized is filling, a 4-bit weight dequantised for `tokens`
    rows is kept when it is no larger than the output it makes (tokens >=
    in_features), so keeping it never costs more than the activation beside it:
    at 1 x 2,048 tokens of a 7B model nothing is kept.
    """
    weight = base.weight
    if getattr(weight, "quant_state", None) is not None:  # bitsandbytes Params4bit
        import bitsandbytes.functional as bnbf

        kept = getattr(_dequantized, "weights", None)
        key = (id(weight), dtype)
        if kept is not None and key in kept:
            return kept[key]
        dense = bnbf.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
        if kept is not None and _dequantized.fill and tokens >= base.in_features:
            kept[key] = dense
        return dense
    return weight.to(dtype)


def _compute_dtype(x):
    import torch

    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


@functools.cache
def _lora_linear():
    """The autograd function, built on first use so importing this module does not import torch."""
    import torch

    class LoraLinear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, lora_a, lora_b, base, scaling: float):
            dtype = _compute_dtype(x)
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            a, b = lora_a.to(dtype), lora_b.to(dtype)
            out = torch.mm(x2, _dense_weight(base, dtype, x2.shape[0]).t())
            if base.bias is not None:
                out += base.bias.to(dtype)
            xa = torch.mm(x2, a.t())
            out.addmm_(xa, b.t(), alpha=scaling)
            ctx.save_for_backward(x2, xa, lora_a, lora_b)
            ctx.base, ctx.scaling, ctx.dtype, ctx.x_shape, ctx.x_dtype = base, scaling, dtype, x.shape, x.dtype
            return out.view(*x.shape[:-1], out.shape[-1])

        @staticmethod
        def backward(ctx, grad):
            x2, xa, lora_a, lora_b = ctx.saved_tensors
            dtype, scaling = ctx.dtype, ctx.scaling
            g = grad.reshape(-1, grad.shape[-1]).to(dtype)
            a, b = lora_a.to(dtype), lora_b.to(dtype)
            gb = torch.mm(g, b)  # (tokens, r)
            dx = grad_a = grad_b = None
            if ctx.needs_input_grad[0]:
                dx = torch.mm(g, _dense_weight(ctx.base, dtype))
                dx.addmm_(gb, a, alpha=scaling)
                dx = dx.view(ctx.x_shape).to(ctx.x_dtype)
            if ctx.needs_input_grad[1]:
                grad_a = torch.mm(gb.t(), x2).mul_(scaling).to(lora_a.dtype)
            if ctx.needs_input_grad[2]:
                grad_b = torch.mm(g.t(), xa).mul_(scaling).to(lora_b.dtype)
            return dx, grad_a, grad_b, None, None

    return LoraLinear


def _fused_forward(self, x, *args, **kwargs):
    """A peft LoRA Linear's forward, fused when it is plain LoRA with one active adapter."""
    if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
        return self._peft_forward(x, *args, **kwargs)
    name = self.active_adapters[0]
    if name not in self.lora_A:
        return self._peft_forward(x)
    return _lora_linear().apply(x, self.lora_A[name].weight, self.lora_B[name].weight, self.get_base_layer(),
                                   float(self.scaling[name]))


def _eligible(module) -> str | None:
    """Why this LoRA layer cannot take the fused path, or None when it can."""
    import torch

    if not hasattr(module, "lora_A"):
        return "not a LoRA layer"
    base = module.get_base_layer()
    if not isinstance(base, torch.nn.Linear):
        return f"base layer is {type(base).__name__}"
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out"
    for name in module.lora_A:
        if not isinstance(module.lora_dropout[name], torch.nn.Identity):
            return "LoRA dropout > 0 (peft's forward applies it)"
        if name in getattr(module, "lora_variant", {}):
            return "a LoRA variant (DoRA)"
    return None


def fuse_lora(model) -> int:
    """Route every eligible LoRA Linear of a peft model through the fused function.

    Layers that cannot be fused (dropout, DoRA, non-Linear bases) keep peft's
    forward; the log says how many and why. Returns the number fused.
    """
    from peft.tuners.lora import LoraLayer

    fused, skipped = 0, dict[str, int]()
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        why = _eligible(module)
        if why is not None:
            skipped[why] = skipped.get(why, 0) + 1
            continue
        layer: Any = module
        layer._peft_forward = layer.forward
        layer.forward = types.MethodType(_fused_forward, layer)
        fused += 1
    for why, count in skipped.items():
        log.info("fused LoRA: %d layer(s) keep peft's forward: %s", count, why)
    log.info("fused LoRA: %d projection(s) fused", fused)
    return fused
