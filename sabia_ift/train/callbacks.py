"""Trainer callbacks of the train stage: DVCLive curves and steady-state speed."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

# Trainer log keys and the curve each one feeds.
CURVES = {"loss": "train/loss", "learning_rate": "train/lr", "grad_norm": "train/grad_norm",
          "eval_loss": "eval/loss"}


class LiveCurves(TrainerCallback):
    """Training curves for `dvc plots`, rebuilt from the Trainer's log history.

    On a resumed run the history comes back from the checkpoint, so the
    curves cover the whole run, not just the part after the interruption.
    No timestamps: the files are identical on every rerun.
    """

    def __init__(self, live_dir: Path) -> None:
        self.live_dir = live_dir
        self.live: Any = None

    def _log(self, step: int, logs: dict[str, Any]) -> None:
        wrote = False
        for key, name in CURVES.items():
            if key in logs and isinstance(logs[key], (int, float)):
                self.live.step = step
                self.live.log_metric(name, float(logs[key]))
                wrote = True
        if wrote:
            self.live.make_summary()

    def on_train_begin(self, args, state, control, **kwargs):
        from dvclive import Live

        if self.live_dir.exists():
            shutil.rmtree(self.live_dir)
        self.live = Live(str(self.live_dir), dvcyaml=False, save_dvc_exp=False, report=None)
        for entry in state.log_history:
            self._log(entry.get("step", 0), entry)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.live is not None and logs:
            self._log(state.global_step, logs)


class StepTimer(TrainerCallback):
    """Steady-state speed: wall time and tokens between optimizer steps.

    The first step (warm-up, compilation, the longest batch) and evaluation
    pauses are left out. `counts` is the collator, which counts tokens.
    """

    def __init__(self, counts) -> None:
        self.counts = counts
        # The largest GPU memory one optimizer step needed, checkpoint saves and evaluations
        # excluded (peak_memory_gib in the timings includes them).
        self.peak_step_gib: float | None = None
        self.peak_all_gib = 0.0  # everything since training began, saves included
        self.last: tuple[float, int, int] | None = None
        self.seconds, self.inputs, self.trained, self.steps = 0.0, 0, 0, 0
        self.first_done = False

    def _mark(self) -> tuple[float, int, int]:
        return time.perf_counter(), self.counts.input_tokens, self.counts.trained_tokens

    def on_step_begin(self, args, state, control, **kwargs):
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.peak_all_gib = max(self.peak_all_gib, torch.cuda.max_memory_allocated() / 2**30)
            torch.cuda.reset_peak_memory_stats()

    def on_step_end(self, args, state, control, **kwargs):
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            peak = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            self.peak_step_gib = max(self.peak_step_gib or 0.0, peak)
        now = self._mark()
        if self.last is not None and self.first_done:
            self.seconds += now[0] - self.last[0]
            self.inputs += now[1] - self.last[1]
            self.trained += now[2] - self.last[2]
            self.steps += 1
        self.first_done = True
        self.last = now

    def on_evaluate(self, args, state, control, **kwargs):
        self.last = None  # the next interval would include the evaluation
