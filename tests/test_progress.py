"""Progress lines for logs (counts, rate, ETA, few lines), and the trackers train.report_to maps to."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import params_for
from sabia_ift.config import parse_section
from sabia_ift.errors import ConfigError
from sabia_ift.progress import Progress, clock, status_line
from sabia_ift.train.progress import progress_callbacks, project_curves, tracker_folders, trainer_report_to


def test_status_line():
    assert status_line("train", 120, 400, 60.0, "step") == \
        "train: step 120/400 (30%), 2.00 step/s, elapsed 1:00, ETA 2:20"
    # Slow work reads as seconds per item; a resumed run's rate counts only what ran since.
    assert status_line("evaluate base", 10, 100, 50.0, "prompt", initial=0) == \
        "evaluate base: prompt 10/100 (10%), 5.00 s/prompt, elapsed 0:50, ETA 7:30"
    assert status_line("train", 60, 100, 10.0, "step", initial=50).endswith("1.00 step/s, elapsed 0:10, ETA 0:40")
    assert clock(3 * 3600 + 7 * 60 + 9) == "3:07:09"


def test_a_log_gets_a_line_every_tenth_not_every_item():
    out = io.StringIO()  # not a terminal, as under dvc repro or CI
    with Progress(1000, "evaluate tuned", unit="prompt", stream=out) as progress:
        for _ in range(1000):
            progress(1)
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and "\r" not in out.getvalue()
    assert lines[0].startswith("evaluate tuned: prompt 100/1000 (10%)") and "ETA" in lines[0]
    assert lines[-1].startswith("evaluate tuned: prompt 1000/1000 (100%)")


def test_slow_work_gets_a_line_every_interval(monkeypatch):
    now = [0.0]
    monkeypatch.setattr("sabia_ift.progress.time.monotonic", lambda: now[0])
    out = io.StringIO()
    progress = Progress(10_000, "train", unit="step", stream=out, every_s=30)
    for _ in range(5):
        now[0] += 31
        progress.update(1)  # far below 10 %, but 30 s passed
    assert len(out.getvalue().splitlines()) == 5


def test_trainer_callback_logs_steps_with_loss_where_no_bar_can_draw():
    out = io.StringIO()
    [callback] = progress_callbacks(out, every_percent=25)
    state = SimpleNamespace(max_steps=8, global_step=0)
    callback.on_train_begin(None, state, None)
    for step in range(1, 9):
        state.global_step = step
        if step == 2:
            callback.on_log(None, state, None, logs={"loss": 1.2345})
        callback.on_step_end(None, state, None)
    callback.on_train_end(None, state, None)
    lines = out.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == [
        "train (loss 1.234): step 2/8 (25%)", "train (loss 1.234): step 4/8 (50%)",
        "train (loss 1.234): step 6/8 (75%)", "train (loss 1.234): step 8/8 (100%)"]


def test_a_terminal_gets_the_trainers_own_bar():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert progress_callbacks(Tty()) == []


def test_generation_reports_each_batch(tiny_base, tokenizer):
    import torch

    from sabia_ift.evaluation.generation import generate
    from sabia_ift.modeling import load_model

    model = load_model(tiny_base, quantization="none", double_quant=False, dtype=torch.float32, device="cpu")
    done = []
    prompts = [[tokenizer.bos_token_id, 500 + i] for i in range(5)]
    generate(model, tokenizer, prompts, max_new_tokens=2, batch_size=2, device="cpu", progress=done.append)
    assert done == [2, 2, 1]


def test_report_to_default_is_the_projects_dvclive_curves():
    cfg = params_for("train")
    assert cfg.report_to == ["dvclive"] and project_curves(cfg.report_to)
    assert trainer_report_to(cfg.report_to) == "none"
    assert trainer_report_to([]) == "none" and not project_curves([])


def test_report_to_refuses_unknown_trackers_by_key():
    with pytest.raises(ConfigError, match=r"train\.report_to\.0: Input should be 'dvclive'"):
        parse_section("train", {"report_to": ["neptune"]})


def test_a_tracker_that_is_not_installed_is_named(monkeypatch):
    from transformers.integrations import integration_utils

    monkeypatch.setattr(integration_utils, "is_wandb_available", lambda: False)
    with pytest.raises(ConfigError, match=r"train\.report_to: wandb is not installed; `pip install wandb`"):
        trainer_report_to(["dvclive", "wandb"])
    monkeypatch.setattr(integration_utils, "is_wandb_available", lambda: True)
    assert trainer_report_to(["dvclive", "wandb"]) == ["wandb"]


def test_the_hub_token_never_reaches_a_tracker(tmp_path, monkeypatch):
    """Trackers get TrainingArguments.to_dict() and the model config; neither may hold the token."""
    from transformers import TrainingArguments

    secret = "hf_secret_do_not_log_123"
    monkeypatch.setenv("HF_TOKEN", secret)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", hub_token=secret, use_cpu=True)
    sent = json.dumps(args.to_dict(), default=str) + json.dumps(params_for("train").model_dump())
    assert secret not in sent


def test_tokenize_reports_rows(tokenizer, capsys):
    from sabia_ift.data.tokenization import tokenize_split

    rows = [{"prompt": f"Pergunta {i}?\n", "response": "Sim."} for i in range(10)]
    tokenize_split(tokenizer, rows, params_for("tokenize", max_length=64), batch=5, label="tokenize train")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines] == ["tokenize train: row 5/10 (50%)",
                                                     "tokenize train: row 10/10 (100%)"]


def test_trackers_write_under_logs_not_the_checkpoints(tmp_path, monkeypatch):
    """TensorBoard wrote under models/checkpoints, which a finished run empties; W&B into the working folder."""
    for name in ("TENSORBOARD_LOGGING_DIR", "WANDB_DIR"):
        monkeypatch.setenv(name, "restored after the test")
        monkeypatch.delenv(name)
    assert tracker_folders(["dvclive"], tmp_path / "logs") == {}
    assert not (tmp_path / "logs").exists()
    chosen = tracker_folders(["dvclive", "tensorboard", "wandb"], tmp_path / "logs")
    board = Path(chosen["TENSORBOARD_LOGGING_DIR"])
    assert board.parent == tmp_path / "logs" / "tensorboard" and board.name  # a folder per run
    assert chosen["WANDB_DIR"] == str(tmp_path / "logs") and (tmp_path / "logs").is_dir()
    assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(board)  # read by the Trainer's callback

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "mine"))
    assert tracker_folders(["tensorboard"], tmp_path / "logs") == {"TENSORBOARD_LOGGING_DIR": str(tmp_path / "mine")}


def test_the_last_validation_loss_joins_the_line():
    out = io.StringIO()
    [callback] = progress_callbacks(out, every_percent=50)
    state = SimpleNamespace(max_steps=4, global_step=0)
    callback.on_train_begin(None, state, None)
    for step, logs in enumerate(({"loss": 2.5}, {"eval_loss": 2.25, "eval_runtime": 0.1}, {"loss": 2.0}, {}), 1):
        state.global_step = step
        callback.on_log(None, state, None, logs=logs)
        callback.on_step_end(None, state, None)
    callback.on_train_end(None, state, None)
    assert [line.split(": step")[0] for line in out.getvalue().splitlines()] == [
        "train (loss 2.5, eval_loss 2.25)", "train (loss 2, eval_loss 2.25)"]


@pytest.mark.parametrize("bar", [False, True], ids=["in a log", "on a terminal"])
def test_the_trainers_raw_log_dicts_stay_out_of_a_log(tmp_path, capsys, bar):
    """With its bar off, the Trainer prints every log as a dict on stdout, between the progress lines."""
    import torch
    from transformers import Trainer, TrainingArguments

    from sabia_ift.train.progress import quiet_trainer_logs

    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, disable_tqdm=not bar)
    trainer = Trainer(model=torch.nn.Linear(2, 2), args=args)
    trainer.log({"loss": 1.2345})
    printed = capsys.readouterr().out
    assert ("{'loss': '1.234'" in printed) == (not bar)  # what the Trainer does by itself
    quiet_trainer_logs(trainer)
    trainer.log({"loss": 1.2345})
    printed = capsys.readouterr()
    assert "'loss'" not in printed.out
    if bar:  # the terminal's bar and its callback are left alone
        assert any(type(c).__name__ == "ProgressCallback" for c in trainer.callback_handler.callbacks)
