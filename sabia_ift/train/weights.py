"""The frozen base's weights as the hot path's matrix products read them.

Both the fused LoRA projections (fused_lora.py) and the layer recompute
(recompute.py) multiply by frozen weights that may be 4-bit; both read them
through here, and share one `KeptWeights`, so a 4-bit weight dequantised in a
recompute is dequantised once for its forward and backward together.
"""

from __future__ import annotations

import threading


def compute_dtype(x):
    """The dtype products of `x` run in: autocast's when it is on, `x`'s otherwise."""
    import torch

    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def forward_dtype(layer, x):
    """The dtype a frozen projection's own forward returns for `x`: bitsandbytes' 4-bit layer
    gives its input's, a Linear the autocast one. What a replacement forward must return too."""
    return x.dtype if getattr(layer.weight, "quant_state", None) is not None else compute_dtype(x)


class KeptWeights:
    """4-bit weights dequantised while a checkpointed half is recomputed, read again by its
    backward. Per thread: autograd runs backward (and so the recompute) in its own."""

    def __init__(self) -> None:
        self._local = threading.local()

    def keep(self, fill: bool) -> None:
        """fill=True: forget the kept weights and keep each one dequantised from now on;
        fill=False: stop adding, but hand out those kept (until the next fill=True)."""
        if fill:
            self._local.weights = {}
        self._local.fill = fill

    def dense(self, base, dtype, tokens: int = 0):
        """The frozen weight as a (out, in) matrix in the compute dtype; dequantised when 4-bit.

        While filling, a 4-bit weight dequantised for `tokens` rows is kept when it
        is no larger than the output it makes (tokens >= in_features), so keeping it
        never costs more than the activation beside it: at 1 x 2,048 tokens of a 7B
        model nothing is kept.
        """
        weight = base.weight
        if getattr(weight, "quant_state", None) is None:
            return weight.to(dtype)
        import bitsandbytes.functional as bnbf

        kept = getattr(self._local, "weights", None)
        key = (id(weight), dtype)
        if kept is not None and key in kept:
            return kept[key]
        dense = bnbf.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
        if kept is not None and self._local.fill and tokens >= base.in_features:
            kept[key] = dense
        return dense


# The one the train stage's projections share (hot_path.py passes it to both users).
KEPT = KeptWeights()


class DenseProducts:
    """The frozen base's products in the compute dtype (`train.base_matmul: dense`): the weight
    dequantised (when 4-bit) and multiplied by cuBLAS / MKL. fp8.Fp8Products has the same methods."""

    def __init__(self, kept: KeptWeights) -> None:
        self.kept = kept

    def prepare(self, x2):
        """The input as `add_frozen` reads it; a group of projections of one input prepares it once."""
        return x2

    def add_frozen(self, out, prepared, base, dtype, tokens: int) -> None:
        """out += x W^T, where `out` already holds the adapter's share (the large product
        accumulates onto it: `addmm_` reads `out` behind its arithmetic)."""
        out.addmm_(prepared, self.kept.dense(base, dtype, tokens).t())

    def add_input_grad(self, dx, g, base, dtype) -> None:
        """dx += dY W, the only gradient a frozen weight gives."""
        dx.addmm_(g, self.kept.dense(base, dtype))


# What the fused LoRA projections use unless the train stage hands them FP8 products.
DENSE = DenseProducts(KEPT)
