"""The frozen base's matrix products in FP8 (`train.base_matmul: fp8`).

In the fast configuration at 7B, the frozen weight's products are most of a
step: per projection, x W^T forward and dY W backward (a frozen weight has no
weight gradient). Hopper's FP8 tensor cores run them at twice bf16's rate. Here
each frozen weight (4-bit or not) is dequantised once, at its first use, to
float8_e4m3fn with one scale for the whole matrix, and kept: one byte a parameter
(6.5 GB at 7B, on top of the 4-bit weights, which stay where they are).
Every product's other operand (the activations forward, the output gradient
backward) is quantised per row on the fly, and `torch._scaled_mm` multiplies
with the scales applied in its epilogue, writing the compute dtype. LoRA's
own products, the adapters and their gradients stay in bf16 (fp32 masters).

Activations and gradients get a scale per row: a LLaMA residual stream has a
few tokens of much larger magnitude than the rest, and one scale for the
tensor would push the others into e4m3's subnormals. A weight gets one scale:
e4m3 rounds every value in its normal range (2^-6 to 448, a span of 28,000)
to the same relative precision, so only elements 28,000 times below the
matrix's largest lose any, and one scale serves both products. A scale per
output row would sit along the backward product's reduction (dY W sums over
output rows), where the kernel cannot apply it: dY would need an extra pass
to fold it in. e4m3 (3 mantissa bits) for gradients too: with a scale per row,
range is not what gradients lack, and the rowwise kernel takes e4m3 alone.
The backward reads the kept FP8 weight transposed, copied into the kernel's
layout (a 4096 x 11008 byte copy is microseconds beside the product).
"""

from __future__ import annotations

import functools
import logging
import types
from typing import Any

from ..errors import ConfigError
from .weights import KEPT, compute_dtype, forward_dtype

log = logging.getLogger(__name__)

# float8_e4m3fn's largest finite value is 448 and a cast beyond it is not saturated.
# Rows are scaled to 440: a bf16 multiply's rounding (2^-8) can never carry one past 448.
FP8_TARGET = 440.0


def check_device(device: str) -> None:
    """FP8 tensor cores are sm89 (Ada) and sm90 (Hopper) and later; torch's CPU kernel runs anywhere.

    Checked in each training process, not by the launcher: asking for the capability starts
    a CUDA context, which the launcher must not hold."""
    if device != "cuda":
        return
    import torch

    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        raise ConfigError(f"train.base_matmul: fp8 needs an FP8 GPU (compute capability 8.9 or later: Ada, "
                         f"Hopper); {torch.cuda.get_device_name()} is {major}.{minor}. Use base_matmul: dense")


def quantise_rows(t):
    """(q, scale): q = t / scale in float8_e4m3fn, one fp32 scale per row ((rows, 1)); t ~ q * scale.

    The scale is computed in t's dtype and its fp32 copy is what the product applies, so q * scale
    is t up to e4m3's rounding alone. An all-zero row's amax is clamped: it quantises to zeros."""
    import torch

    # Autocast would run the norm in fp32, over an fp32 copy of the whole tensor.
    with torch.autocast(t.device.type, enabled=False):
        amax = torch.linalg.vector_norm(t, ord=float("inf"), dim=1, keepdim=True).float().clamp_(min=1e-30)
        inverse = (FP8_TARGET / amax).to(t.dtype)
        q = (t * inverse).to(torch.float8_e4m3fn)
        return q, inverse.float().reciprocal_()


def _scaled_mm(a, b, scale_a, scale_b, dtype):
    """a @ b as torch._scaled_mm takes it: a row-major, b column-major (the one layout Hopper's
    FP8 kernels read); scale_a (rows of a, 1) and scale_b (1, columns of b) in fp32, applied to
    the fp32 accumulator before it is written in `dtype`."""
    import torch

    with torch.autocast(a.device.type, enabled=False):
        return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=dtype)


class Fp8Weight:
    """A frozen weight kept in FP8: q (out, in) and its one scale, laid out as each product's
    kernel takes it: (1, out) for x W^T, (1, in) for dY W."""

    __slots__ = ("q", "scale_out", "scale_in")

    def __init__(self, dense) -> None:
        q, scale = quantise_rows(dense.reshape(1, -1))
        self.q = q.view(dense.shape)
        self.scale_out = scale.expand(1, dense.shape[0]).contiguous()
        self.scale_in = scale.expand(1, dense.shape[1]).contiguous()


class Fp8Products:
    """The frozen products of `weights.DenseProducts`, in FP8; the FP8 copies of the weights live here.

    Keyed by the base layer's identity: one copy a frozen projection, built at its first product."""

    def __init__(self) -> None:
        self._weights: dict[int, tuple[Any, Fp8Weight]] = {}
        self.bytes = 0

    def weight(self, base) -> Fp8Weight:
        kept = self._weights.get(id(base))
        if kept is not None and kept[0] is base:
            return kept[1]
        import torch

        with torch.no_grad():
            fp8 = Fp8Weight(KEPT.dense(base, torch.float32))
        self._weights[id(base)] = (base, fp8)
        self.bytes += fp8.q.numel()
        if len(self._weights) == 1:
            log.info("base_matmul fp8: frozen weights kept in float8_e4m3fn, one scale a matrix")
        return fp8

    def prepare(self, x2):
        return quantise_rows(x2)

    def product(self, prepared, base, dtype):
        """x W^T in `dtype`, from `prepare(x)`."""
        q, scale = prepared
        w = self.weight(base)
        return _scaled_mm(q, w.q.t(), scale, w.scale_out, dtype)

    def add_frozen(self, out, prepared, base, dtype, tokens: int) -> None:
        out.add_(self.product(prepared, base, dtype))

    def input_grad(self, g, base, dtype):
        """dY W in `dtype`."""
        w = self.weight(base)
        q, scale = quantise_rows(g)
        # The kernel reads its second operand column-major: W^T's rows laid out contiguously.
        weight_t = w.q.t().contiguous()
        return _scaled_mm(q, weight_t.t(), scale, w.scale_in, dtype)

    def add_input_grad(self, dx, g, base, dtype) -> None:
        dx.add_(self.input_grad(g, base, dtype))


@functools.cache
def _frozen_linear():
    """A frozen projection (no LoRA on it) whose products are FP8; it saves no activation."""
    import torch

    class Fp8Linear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, base, products, out_dtype):
            dtype = compute_dtype(x)
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            out = products.product(products.prepare(x2), base, dtype)
            if base.bias is not None:
                out += base.bias.to(dtype)
            ctx.base, ctx.products, ctx.dtype, ctx.x_shape, ctx.x_dtype = base, products, dtype, x.shape, x.dtype
            return out.view(*x.shape[:-1], out.shape[-1]).to(out_dtype)

        @staticmethod
        def backward(ctx, grad):
            g = grad.reshape(-1, grad.shape[-1]).to(ctx.dtype)
            dx = ctx.products.input_grad(g, ctx.base, ctx.dtype)
            return dx.view(ctx.x_shape).to(ctx.x_dtype), None, None, None

    return Fp8Linear


def _frozen_forward(products, self, x, *args, **kwargs):
    if args or kwargs:
        return self._dense_forward(x, *args, **kwargs)
    return _frozen_linear().apply(x, self, products, forward_dtype(self, x))


def route_frozen(model, products: Fp8Products) -> int:
    """Every frozen Linear of the decoder layers (4-bit or not) multiplies in FP8; returns how many.

    The LM head stays in the compute dtype (Liger's fused loss reads its weight, and its
    product feeds the loss directly); LoRA's own A and B are trainable and are left alone.
    A LoRA-tuned projection's base runs here only on peft's unfused path: the fused one
    (fused_lora.py) takes the same products itself."""
    import torch

    head = model.get_output_embeddings()
    routed = 0
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear) or module is head or module.weight.requires_grad:
            continue
        if module.in_features % 16 or module.out_features % 16:  # (a 4-bit weight's shape is its packing's)
            continue  # the FP8 kernel needs both dimensions in multiples of 16
        layer: Any = module
        layer._dense_forward = layer.forward
        layer.forward = types.MethodType(functools.partial(_frozen_forward, products), layer)
        routed += 1
    log.info("base_matmul fp8: %d frozen projection(s) multiply in FP8", routed)
    return routed
