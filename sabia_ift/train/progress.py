"""What training shows while it runs, and which experiment trackers it reports to.

Progress: in a terminal the Trainer's own tqdm bar; under `dvc repro` or CI
(stderr not a terminal) one plain line every 30 s or 10 % of the steps with
the step count, rate, ETA and the last losses, instead of a bar redrawn with
`\\r` into one unreadable line, and without the raw `{'loss': ...}` dicts the
Trainer prints when its bar is off.

Trackers: `train.report_to` lists `dvclive` (the project's own curves in
metrics/curves, written by the train stage's callback) and any of the
Trainer's integrations below. Only the Trainer's arguments and the model
config reach them; `TrainingArguments.to_dict()` blanks every `*_token`
field, and the Hub token itself lives in the environment (HF_TOKEN), which
no integration logs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from ..config import TRACKER_PACKAGES
from ..errors import ConfigError
from ..progress import Progress, interactive

# The project's own DVCLive callback, not the Trainer's DVCLive integration
# (which would rewrite dvc.yaml and log wall-clock timestamps).
PROJECT_TRACKER = "dvclive"
# Trainer integration name -> its availability check in transformers.integrations.
TRAINER_TRACKERS = {
    "wandb": "is_wandb_available",
    "mlflow": "is_mlflow_available",
    "tensorboard": "is_tensorboard_available",
}
TRACKERS = (PROJECT_TRACKER, *TRAINER_TRACKERS)


def trainer_report_to(report_to: Sequence[str]) -> list[str] | str:
    """`TrainingArguments.report_to` for `train.report_to`: the Trainer's integrations, checked installed.

    `dvclive` is left out (the train stage's own callback writes those curves);
    "none" when nothing else is asked, since the Trainer would otherwise report
    to every integration it finds installed.
    """
    from transformers.integrations import integration_utils

    unknown = [name for name in report_to if name not in TRACKERS]
    if unknown:
        raise ConfigError(f"train.report_to: unknown tracker(s) {', '.join(unknown)}; known: {', '.join(TRACKERS)}")
    chosen = []
    for name in report_to:
        if name == PROJECT_TRACKER or name in chosen:
            continue
        package = TRACKER_PACKAGES[name][0]
        if not getattr(integration_utils, TRAINER_TRACKERS[name])():
            raise ConfigError(f"train.report_to: {name} is not installed; `pip install {package}` "
                              f"or remove {name} from train.report_to")
        chosen.append(name)
    return chosen or "none"


def tracker_folders(report_to: Sequence[str], logs_dir: str | Path) -> dict[str, str]:
    """Point the Trainer's local trackers at `logs_dir`; returns the variables it set.

    Left alone, TensorBoard writes under the Trainer's output folder,
    models/checkpoints, which a finished run empties: the event file was gone
    before anyone looked. Each run gets a folder of its own, as TensorBoard
    expects (`tensorboard --logdir logs/tensorboard`). W&B's local run files go
    to logs/wandb instead of the working folder. A variable the user already
    set wins.
    """
    logs_dir = Path(logs_dir)
    chosen = {}
    if "tensorboard" in report_to:
        chosen["TENSORBOARD_LOGGING_DIR"] = str(logs_dir / "tensorboard" / time.strftime("%Y-%m-%d_%H-%M-%S"))
    if "wandb" in report_to:
        chosen["WANDB_DIR"] = str(logs_dir)  # wandb adds its own wandb/ folder below
    for name, value in chosen.items():
        os.environ.setdefault(name, value)
    if chosen:
        # Older wandb versions write to a temporary folder instead when WANDB_DIR is missing.
        logs_dir.mkdir(parents=True, exist_ok=True)
    return {name: os.environ[name] for name in chosen}


def project_curves(report_to: Sequence[str]) -> bool:
    """Whether the train stage writes its DVCLive curves."""
    return PROJECT_TRACKER in report_to


def show_tqdm(stream: TextIO | None = None) -> bool:
    """The Trainer's bar only where it can redraw (`disable_tqdm=not show_tqdm()`)."""
    return interactive(stream)


def _callback_class():
    from transformers import TrainerCallback

    class StepProgress(TrainerCallback):
        """`train: step 120/400 (30%), 2.31 step/s, elapsed 0:52, ETA 2:01, loss 1.234` at intervals.

        On a resumed run the count starts at the checkpoint's step and the rate
        counts only the steps run since.
        """

        def __init__(self, stream: TextIO | None, every_s: float, every_percent: float) -> None:
            self.stream, self.every_s, self.every_percent = stream, every_s, every_percent
            self.progress: Progress | None = None
            self.losses: dict[str, float] = {}  # the last training and validation losses logged

        def on_train_begin(self, args, state, control, **kwargs):
            self.progress = Progress(state.max_steps or None, "train", unit="step", stream=self.stream,
                                     every_s=self.every_s, every_percent=self.every_percent, bar=False,
                                     initial=state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            for key in ("loss", "eval_loss"):
                if logs and isinstance(logs.get(key), (int, float)):
                    self.losses[key] = float(logs[key])
            if self.losses and self.progress is not None:
                shown = ", ".join(f"{key} {value:.4g}" for key, value in self.losses.items())
                self.progress.label = f"train ({shown})"

        def on_step_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress.update(state.global_step - self.progress.done)

        def on_train_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress.close()
                self.progress = None

    return StepProgress


def progress_callbacks(stream: TextIO | None = None, *, every_s: float = 30.0,
                       every_percent: float = 10.0) -> list:
    """Trainer callbacks that log progress lines where no bar can be drawn (none on a terminal)."""
    if show_tqdm(stream):
        return []
    return [_callback_class()(stream, every_s, every_percent)]


def quiet_trainer_logs(trainer) -> None:
    """Stop the Trainer printing each log as a raw dict where its bar is off (`disable_tqdm`).

    With the bar off the Trainer adds its PrinterCallback, which prints `{'loss': ...}` to
    stdout at every logging step, between the progress lines that already carry the loss.
    On a terminal the bar writes them beneath itself, as the Trainer always does.
    """
    from transformers.trainer_callback import PrinterCallback

    if trainer.args.disable_tqdm:
        trainer.remove_callback(PrinterCallback)
