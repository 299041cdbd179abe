"""How the trained tokens of an optimizer step share its gradient: alike, or row by row.

`train.loss_weighting: tokens` is the Trainer's own loss: the mean over every
trained token of the step, so a long answer weighs as much as many short ones.
`rows` gives every row of the run one equal share, split among its own
tokens, which is what batches of a fixed number of rows of similar length
did: a batch of short answers gave each of their few tokens, the
end-of-sequence token included, a large share. Packed batches lose that, as a
step of many short rows weighs as much as a step of a few long ones
(BENCHMARKS.md measures what that does on the embedded default).

The weights act on the gradient of the decoder's last hidden states, the
input of the output projection and its cross-entropy. The loss itself is
untouched, so every cross-entropy kernel keeps working (Liger's fused one never
materialises per-token losses), and the logged train loss stays the token mean
that compares with `eval_loss`. Every trainable weight sits upstream of those
hidden states (the output projection is refused as a LoRA target in this
mode), so the gradient is exactly that of the rows' mean losses, summed and
divided by the run's average rows per step.
"""

from __future__ import annotations

import functools
from typing import Any

from ..errors import ConfigError
from ..template import IGNORE_INDEX

KEY = "row_weights"  # the batch key the Trainer carries from get_batch_samples to compute_loss


def trained_positions(labels):
    """True where the hidden state at that position predicts a trained label (the next token's)."""
    import torch

    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def row_ids(labels, position_ids=None):
    """Each position's row: the batch row when padded, or, for packed rows (one
    sequence whose positions restart at 0 on each row), the count of restarts."""
    import torch

    if position_ids is None:
        return torch.arange(labels.shape[0]).unsqueeze(1).expand_as(labels)
    starts = (position_ids == 0).flatten().long()
    return (torch.cumsum(starts, 0) - 1).view_as(labels)


def row_shares(batch) -> tuple[Any, int]:
    """(per-position share, trained tokens) of one micro-batch on CPU tensors.

    A position's share is 1 / (its row's trained tokens) where it predicts a
    trained token, else 0: every row's shares add up to 1. A row's first token
    is never trained, so no position predicts across a row boundary.
    """
    import torch

    labels = batch["labels"]
    mask = trained_positions(labels)
    ids = row_ids(labels, batch.get("position_ids"))
    _, inverse, counts = torch.unique(ids[mask], return_inverse=True, return_counts=True)
    shares = torch.zeros(labels.shape, dtype=torch.float32)
    shares[mask] = 1.0 / counts[inverse].float()
    return shares, int(mask.sum())


def weigh_step(batches: list, rows_per_step: float, gather=None) -> None:
    """Add each micro-batch's gradient weights for one optimizer step, in place.

    The Trainer divides the step's summed token losses by its trained tokens
    N (over every process). A weight of N / (R * n) on a token of a row with n
    trained tokens turns that into the sum of each row's mean loss over R,
    the run's average rows per optimizer step: every row weighs the same in
    the whole run, as in batches of a fixed number of rows, even when a packed
    step holds many short rows or few long ones. `gather` sums the trained
    tokens over processes.
    """
    import torch

    found = [row_shares(batch) for batch in batches]
    tokens = torch.tensor([float(sum(f[1] for f in found))], dtype=torch.float64)
    if gather is not None:
        tokens = gather(tokens)
    scale = float(tokens[0]) / rows_per_step
    for batch, (shares, _) in zip(batches, found, strict=True):
        batch[KEY] = shares * scale


def rows_per_step(rows: int, micro_batches_per_epoch: int, micro_batches_per_step: int) -> float:
    """The run's average rows per optimizer step (every process together)."""
    return rows / max(micro_batches_per_epoch // micro_batches_per_step, 1)


@functools.cache
def _scale_grad():
    """An autograd function: identity forward; the backward multiplies each position's gradient by its weight."""
    import torch

    class ScaleGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weights):
            ctx.save_for_backward(weights)
            return hidden.view_as(hidden)

        @staticmethod
        def backward(ctx, grad):
            (weights,) = ctx.saved_tensors
            return (grad * weights.unsqueeze(-1)).to(grad.dtype), None

    return ScaleGrad


class RowWeighting:
    """Applies a micro-batch's weights to the decoder's output while the Trainer computes its loss."""

    def __init__(self, rows_per_step: float) -> None:
        self.rows_per_step = rows_per_step
        self.weights = None

    def attach(self, decoder) -> None:
        def scale(module, args, kwargs, output):
            if self.weights is None or not module.training:
                return output
            hidden = output.last_hidden_state
            if self.weights.shape != hidden.shape[:2]:
                raise RuntimeError(f"row weights of shape {tuple(self.weights.shape)} for hidden states of "
                                   f"shape {tuple(hidden.shape)}")
            output.last_hidden_state = _scale_grad().apply(hidden, self.weights.to(hidden.device))
            return output

        decoder.register_forward_hook(scale, with_kwargs=True)


def check_targets(loss_weighting: str, target_modules) -> None:
    """The weights act below the output projection: training it would skip them."""
    if loss_weighting == "rows" and "lm_head" in set(target_modules):
        raise ConfigError("train.loss_weighting: rows weighs the gradient below the output projection; "
                          "remove lm_head from train.lora.target_modules or use tokens")
