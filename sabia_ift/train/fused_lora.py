"""LoRA projections as one autograd function, with no pass over the activations but the products.

peft's LoRA forward computes the frozen projection, copies it ("defensive
clone" for 4-bit), computes B(A(x)), scales it in a separate pass and adds it in
another; autograd then sums the input gradients of the two branches in yet
another pass. At 7B each such pass over (tokens x 4,096) activations costs
about as much as the attention. Here the adapter's small product writes the
output and the frozen weight's product accumulates onto it (`addmm_`); in
backward the input gradient is built the same way. Projections that read one
input (LLaMA's q/k/v, gate/up) run as one function: one x A^T for all their
adapters and one input-gradient buffer they all add into, where autograd
would sum one tensor per projection. The frozen weight (4-bit or not) is
dequantised once per pass, as bitsandbytes does.

Numerically the same LoRA: the tests compare outputs and gradients with peft's
own forward. The adapter weights stay in their own dtype (fp32 master weights
under bf16 autocast); only their bf16 copies enter the GEMMs, as under autocast.
"""

from __future__ import annotations

import functools
import logging
import types
from typing import Any

from . import kernels
from .weights import DENSE, compute_dtype

log = logging.getLogger(__name__)


def _project_forward(x2, members, products, adapters, dtype):
    """Each member's output (2-D) and x A^T of all members, for x2 (tokens, in) in `dtype`."""
    import torch

    tokens = x2.shape[0]
    prepared = products.prepare(x2)  # once for every member (FP8: x quantised once)
    a_all = torch.cat([a.to(dtype) for a in adapters[0::2]])
    xa = torch.mm(x2, a_all.t())  # (tokens, sum of ranks)
    outs, col = [], 0
    for (base, scaling), b in zip(members, adapters[1::2]):
        rank = b.shape[1]
        # s B rounded once from its fp32 master, as s (xA) B would be rounded once.
        out = torch.mm(xa[:, col:col + rank], (b * scaling).to(dtype).t())
        if base.bias is not None:
            out += base.bias.to(dtype)
        products.add_frozen(out, prepared, base, dtype, tokens)
        outs.append(out)
        col += rank
    return outs, xa


def _project_backward(ctx, x2, xa, adapters, grads, first_adapter: int):
    """The input gradient (2-D, or None when not needed or no output was read) and the adapters'
    gradients, from each member's output gradient (None where nothing read that output).
    `ctx.needs_input_grad[first_adapter]` is the first member's A."""
    import torch

    dtype, members = ctx.dtype, ctx.members
    live, gbs, a_scaled, col = [], [], [], 0
    adapter_grads: list[Any] = [None] * len(adapters)
    for i, ((base, scaling), grad) in enumerate(zip(members, grads)):
        a, b = adapters[2 * i], adapters[2 * i + 1]
        rank = b.shape[1]
        if grad is not None:  # an output nothing read gives no gradient
            g = grad.reshape(-1, grad.shape[-1]).to(dtype)
            gbs.append(torch.mm(g, b.to(dtype)))  # (tokens, r)
            a_scaled.append((a * scaling).to(dtype))
            live.append((i, base, g))
            if ctx.needs_input_grad[first_adapter + 1 + 2 * i]:
                grad_b = torch.mm(g.t(), xa[:, col:col + rank]).mul_(scaling)
                adapter_grads[2 * i + 1] = grad_b.to(b.dtype)
        col += rank
    if not live:
        return None, adapter_grads
    gb = torch.cat(gbs, dim=1) if len(gbs) > 1 else gbs[0]
    needs_a = any(ctx.needs_input_grad[first_adapter + 2 * i] for i, _, _ in live)
    grad_a_all = torch.mm(gb.t(), x2) if needs_a else None
    row = 0
    for i, _, _ in live:
        a, scaling = adapters[2 * i], members[i][1]
        if grad_a_all is not None and ctx.needs_input_grad[first_adapter + 2 * i]:
            adapter_grads[2 * i] = grad_a_all[row:row + a.shape[0]].mul(scaling).to(a.dtype)
        row += a.shape[0]
    dx = None
    if ctx.needs_input_grad[0]:
        dx = torch.mm(gb, torch.cat(a_scaled) if len(a_scaled) > 1 else a_scaled[0])
        for _, base, g in live:
            ctx.products.add_input_grad(dx, g, base, dtype)
    return dx, adapter_grads


@functools.cache
def _lora_projections():
    """The autograd function, built on first use so importing this module does not import torch."""
    import torch

    class LoraProjections(torch.autograd.Function):
        """LoRA projections of one input x: out_i = x W_i^T + s_i (x A_i^T) B_i^T, for each member i.

        Every memory-bound pass over a (tokens x out) tensor is a cost at 7B, so:
        the adapter's rank-r product writes each output and the large product
        adds itself on top (`addmm_`, whose read of the output hides behind its
        arithmetic); all members' x A^T is one product; in backward the input
        gradient is one buffer that every member's products add into, instead
        of one tensor per member that autograd then sums.
        """

        @staticmethod
        def forward(ctx, x, members, products, *adapters):
            dtype = compute_dtype(x)
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            outs, xa = _project_forward(x2, members, products, adapters, dtype)
            ctx.save_for_backward(x2, xa, *adapters)
            ctx.members, ctx.products, ctx.dtype, ctx.x_shape, ctx.x_dtype = members, products, dtype, x.shape, x.dtype
            ctx.set_materialize_grads(False)
            return tuple(out.view(*x.shape[:-1], out.shape[-1]) for out in outs)

        @staticmethod
        def backward(ctx, *grads):
            x2, xa, *adapters = ctx.saved_tensors
            dx, adapter_grads = _project_backward(ctx, x2, xa, adapters, grads, first_adapter=3)
            if dx is not None:
                dx = dx.view(ctx.x_shape).to(ctx.x_dtype)
            return (dx, None, None, *adapter_grads)

    return LoraProjections


@functools.cache
def _swiglu_down():
    """A SwiGLU MLP's activation and its LoRA-tuned down projection as one autograd function."""
    import torch

    class SwiGLUDown(torch.autograd.Function):
        """down(silu(a) * b) with LoRA on down, saving a and b but not silu(a) * b.

        The down projection's LoRA needs its input h = silu(a) * b for its A gradient, and the
        activation's backward needs a and b. Saving all three keeps a third (tokens x
        intermediate) tensor a layer: at 7B and 16,384 tokens 344 MiB, 11 GiB over 32 layers.
        Here h is computed again from a and b in backward (one elementwise pass), by the
        kernel that computed it forward, so every gradient is what the plain layer gives.
        """

        @staticmethod
        def forward(ctx, a, b, liger, members, products, *adapters):
            a, b = a.contiguous(), b.contiguous()
            h = kernels.swiglu(a, b, liger)
            dtype = compute_dtype(h)
            outs, xa = _project_forward(h.reshape(-1, h.shape[-1]).to(dtype), members, products, adapters, dtype)
            ctx.save_for_backward(a, b, xa, *adapters)
            ctx.liger, ctx.members, ctx.products, ctx.dtype = liger, members, products, dtype
            return outs[0].view(*h.shape[:-1], outs[0].shape[-1])

        @staticmethod
        def backward(ctx, grad):
            a, b, xa, *adapters = ctx.saved_tensors
            h = kernels.swiglu(a, b, ctx.liger)
            x2 = h.reshape(-1, h.shape[-1]).to(ctx.dtype)
            dh, adapter_grads = _project_backward(ctx, x2, xa, adapters, (grad,), first_adapter=5)
            del h, x2
            if dh is None:  # a and b need no gradient (nothing trainable before them)
                return (None, None, None, None, None, *adapter_grads)
            da, db = kernels.swiglu_grads(a, b, dh.view(a.shape).to(a.dtype), ctx.liger)
            return (da, db, None, None, None, *adapter_grads)

    return SwiGLUDown


def _active(layer) -> str | None:
    """The one active adapter the fused path can take for this layer now, or None."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    return name if name in layer.lora_A else None


def _project(products, x, layers, names):
    members = tuple((layer.get_base_layer(), float(layer.scaling[name])) for layer, name in zip(layers, names))
    adapters = [w for layer, name in zip(layers, names)
                for w in (layer.lora_A[name].weight, layer.lora_B[name].weight)]
    return _lora_projections().apply(x, members, products, *adapters)


def _fused_forward(products, self, x, *args, **kwargs):
    """A peft LoRA Linear's forward, fused when it is plain LoRA with one active adapter.

    In a group of siblings that read the same input (q/k/v, gate/up), the first
    one called projects all of them and the others take their outputs when
    called with that same tensor.
    """
    name = None if args or kwargs else _active(self)
    if name is None:
        return self._peft_forward(x, *args, **kwargs)
    group = getattr(self, "_sabia_group", None)
    if group is None:
        return _project(products, x, [self], [name])[0]
    pending = group["pending"]
    if pending is not None and pending[0] is x and self in pending[1]:
        out = pending[1].pop(self)
        if not pending[1]:
            group["pending"] = None
        return out
    layers, names = [self], [name]
    for other in group["members"]:
        other_name = _active(other) if other is not self else None
        if other_name is not None:
            layers.append(other)
            names.append(other_name)
    outs = _project(products, x, layers, names)
    # Held only until the siblings are called, which LLaMA's attention and MLP do at once.
    group["pending"] = (x, dict(zip(layers[1:], outs[1:]))) if len(layers) > 1 else None
    return outs[0]


def _swiglu_down_forward(products, liger: bool, self, x):
    """A SwiGLU MLP whose down projection is a fused LoRA layer: the activation and that
    projection in one function (`_swiglu_down`), which keeps no copy of the activation."""
    down = self.down_proj
    name = _active(down)
    if name is None:
        return self._unfused_forward(x)
    members = ((down.get_base_layer(), float(down.scaling[name])),)
    return _swiglu_down().apply(self.gate_proj(x), self.up_proj(x), liger, members, products,
                                down.lora_A[name].weight, down.lora_B[name].weight)


# Sibling projections that LLaMA-family layers apply to one input.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


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


def fuse_lora(model, products=DENSE) -> int:
    """Route every eligible LoRA Linear of a peft model through the fused function, whose
    frozen products `products` computes (weights.DenseProducts, or fp8.Fp8Products).

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
        layer.forward = types.MethodType(functools.partial(_fused_forward, products), layer)
        fused += 1
    grouped = 0
    for module in model.modules():
        for names in GROUPS:
            siblings: list[Any] = [getattr(module, n) for n in names
                                   if hasattr(getattr(module, n, None), "_peft_forward")]
            if len(siblings) > 1:
                group = {"members": siblings, "pending": None}
                for sibling in siblings:
                    sibling._sabia_group = group
                grouped += 1
    activations = 0
    for module in model.modules():
        kind = kernels.swiglu_kind(module)
        if kind is not None and hasattr(getattr(module, "down_proj", None), "_peft_forward"):
            mlp: Any = module
            mlp._unfused_forward = mlp.forward
            mlp.forward = types.MethodType(functools.partial(_swiglu_down_forward, products, kind == "liger"), mlp)
            activations += 1
    for why, count in skipped.items():
        log.info("fused LoRA: %d layer(s) keep peft's forward: %s", count, why)
    log.info("fused LoRA: %d projection(s) fused, %d group(s) of siblings projected together, %d SwiGLU "
             "activation(s) recomputed for their down projection's backward", fused, grouped, activations)
    return fused
