"""Stop training the moment its numbers stop being numbers."""

from __future__ import annotations

import math

from transformers import TrainerCallback

from ..errors import SabiaError

# Logged values that are NaN or infinite only when training has diverged.
WATCHED = ("loss", "grad_norm", "eval_loss")


class NonFiniteLossError(SabiaError):
    """The loss (or gradient norm) became NaN or infinite: the run has diverged."""


class NonFiniteLossGuard(TrainerCallback):
    """Raises NonFiniteLossError at the first NaN or infinite loss or gradient norm logged.

    A diverged run would otherwise go on to the end, exit 0, and save an
    adapter of NaN weights. The Trainer must log every step's loss as it is
    (`logging_nan_inf_filter=False`): its default filter replaces a NaN step's
    loss with the running mean and hides the divergence.
    """

    def __init__(self, lr: float | None = None) -> None:
        self.lr = lr

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in WATCHED:
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                lr = f" (train.lr is {self.lr:g})" if self.lr is not None else ""
                raise NonFiniteLossError(
                    f"train: {key} became {value} at step {state.global_step}: the run diverged{lr}; "
                    "lower train.lr, raise train.warmup, or check the data (metrics/tokenize.json)"
                )
