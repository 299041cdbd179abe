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
