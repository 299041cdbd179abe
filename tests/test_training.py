"""Training on the tiny base: loss moves, the adapter is a plain PEFT folder, checkpoints are handled."""

import json

import pytest

from conftest import params_for, tokenized_split
from sabia_ift.train.training import CHECKPOINT_PREFIX, complete_checkpoints, prepare_checkpoints, train


@pytest.fixture(scope="module")
def tokenized(tokenizer, tmp_path_factory):
    return tokenized_split(tmp_path_factory.mktemp("data"), tokenizer, 96, 64, 16)


def small_config(**overrides):
    values = dict(epochs=1, micro_batch_size=8, lr=3e-3, logging_steps=2, eval_steps=4, save_steps=4,
                  lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]})
    return params_for("train", **{**values, **overrides})


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_train_writes_a_loadable_adapter_and_metrics(tiny_base, tokenized, tmp_path, quantization):
    from peft import PeftConfig

    metrics, timings = train(small_config(quantization=quantization), tiny_base, tokenized, tmp_path / "adapter",
                             tmp_path / "ckpt", tmp_path / "live")
    assert metrics["steps"] == 8
    assert metrics["final_train_loss"] < metrics["first_train_loss"]
    # r=4 on q/v of 2 layers of width 128: 2 * 2 * 4 * (128 + 128).
    assert metrics["trainable_params"] == 4096
    assert timings["steady_input_tokens_per_s"] > 0 and timings["step_time_s"] > 0
    assert timings["rows_seen"] == 64 and timings["processes"] == 1
    # Machine measurements stay out of the results, which must be identical on every rerun.
    assert not {"runtime_s", "peak_memory_gib", "step_time_s"} & set(metrics)
    # The whole stage's peak (final evaluation and saving included) is at least the training peak.
    assert timings["stage_peak_memory_gib"] >= timings["peak_memory_gib"] > 0
    config = PeftConfig.from_pretrained(str(tmp_path / "adapter"))
    assert config.r == 4 and sorted(config.target_modules) == ["q_proj", "v_proj"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    # The finished run leaves no checkpoint behind to change the next one.
    assert list((tmp_path / "ckpt").iterdir()) == []
    # Curves for dvc plots, steps ascending, no timestamps (identical on rerun).
    loss = (tmp_path / "live" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert loss[0].split("\t") == ["step", "loss"] and len(loss) > 3
    assert (tmp_path / "live" / "plots" / "metrics" / "eval" / "loss.tsv").is_file()


def test_checkpoints_of_another_run_are_not_resumed(tmp_path):
    ckpt = tmp_path / "ckpt"
    (ckpt / f"{CHECKPOINT_PREFIX}4").mkdir(parents=True)
    (ckpt / f"{CHECKPOINT_PREFIX}4" / "trainer_state.json").write_text("{}")
    (ckpt / "run.json").write_text(json.dumps({"fingerprint": "other-run"}))
    assert prepare_checkpoints(ckpt, "this-run") is None
    assert sorted(p.name for p in ckpt.iterdir()) == ["run.json"]
    assert json.loads((ckpt / "run.json").read_text())["fingerprint"] == "this-run"


def test_resume_picks_the_last_complete_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "run.json").write_text(json.dumps({"fingerprint": "run"}))
    for step, complete in ((4, True), (8, True), (12, False)):  # 12 was cut off mid-save
        folder = ckpt / f"{CHECKPOINT_PREFIX}{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    assert [p.name for p in complete_checkpoints(ckpt)] == ["checkpoint-4", "checkpoint-8"]
    assert prepare_checkpoints(ckpt, "run").name == "checkpoint-8"
    assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoint-8", "run.json"]


def test_cuda_on_a_cpu_machine_is_a_clear_error(tiny_base, tokenized, tmp_path):
    import torch

    from sabia_ift.errors import ConfigError

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="train.device: cuda was asked for but no CUDA GPU is visible"):
        train(small_config(device="cuda"), tiny_base, tokenized, tmp_path / "a", tmp_path / "c", None)


def test_packed_training_trains_the_same_rows(tiny_base, tokenized, tmp_path):
    metrics, timings = train(small_config(packing=True, micro_batch_tokens=1024, epochs=2), tiny_base, tokenized,
                             tmp_path / "adapter", tmp_path / "ckpt", tmp_path / "live")
    # The validation rows, the same at every evaluation, lose loss (a packed step's train loss
    # depends on which rows share its bin, and they change every epoch).
    rows = (tmp_path / "live" / "plots" / "metrics" / "eval" / "loss.tsv").read_text().splitlines()[1:]
    evals = [float(row.split("\t")[1]) for row in rows]
    assert len(evals) >= 2 and evals[-1] < evals[0]
    # Every row once an epoch, none repeated or dropped.
    assert timings["rows_seen"] == 2 * 64 and timings["global_batch"]["tokens"] == 1024
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_row_weighting_changes_the_gradient_not_the_logged_loss(tiny_base, tokenized, tmp_path):
    runs = [train(small_config(packing=True, micro_batch_tokens=512, grad_accum=2, max_steps=3, logging_steps=1,
                               loss_weighting=weighting), tiny_base, tokenized, tmp_path / weighting / "adapter",
                  tmp_path / weighting / "ckpt", None)[0] for weighting in ("tokens", "rows")]
    # The first loss is computed before any update: the token mean either way.
    assert runs[1]["first_train_loss"] == runs[0]["first_train_loss"]
    # The updates differ, so the later losses do.
    assert runs[1]["final_train_loss"] != runs[0]["final_train_loss"]


@pytest.mark.parametrize(("key", "value", "message"), [
    ("kernels", "liger", "train.kernels: liger needs a CUDA GPU"),
    ("attention", "varlen", "train.attention: varlen runs on CUDA"),
])
def test_cuda_only_options_on_cpu_are_clear_errors(tiny_base, tokenized, tmp_path, key, value, message):
    from sabia_ift.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        train(small_config(**{key: value, "packing": True}), tiny_base, tokenized, tmp_path / "a", tmp_path / "c", None)


@pytest.mark.parametrize("mode", ["on", "offload"])
def test_gradient_checkpointing_keeps_lora_gradients(tiny_base, tokenized, tmp_path, mode):
    metrics, _ = train(small_config(gradient_checkpointing=mode), tiny_base, tokenized, tmp_path / "adapter",
                       tmp_path / "ckpt", None)
    assert metrics["final_train_loss"] < metrics["first_train_loss"]


def test_non_finite_loss_stops_training():
    import math

    from transformers import TrainerControl, TrainerState, TrainingArguments

    from sabia_ift.errors import SabiaError
    from sabia_ift.train.guards import NonFiniteLossError, NonFiniteLossGuard

    guard = NonFiniteLossGuard(lr=2e-4)
    state = TrainerState()
    state.global_step = 7
    args = TrainingArguments(output_dir="unused", report_to="none")
    guard.on_log(args, state, TrainerControl(), logs={"loss": 2.5, "grad_norm": 1.0})
    for key, value in (("loss", math.nan), ("grad_norm", math.inf), ("eval_loss", -math.inf)):
        with pytest.raises(NonFiniteLossError, match=f"train: {key} became .* at step 7: the run diverged"):
            guard.on_log(args, state, TrainerControl(), logs={key: value})
    assert issubclass(NonFiniteLossError, SabiaError)


def test_nan_losses_are_not_hidden_from_the_guard(tmp_path):
    from sabia_ift.train.distributed import World
    from sabia_ift.train.training import training_arguments

    one = World(1, 0, 0)
    args = training_arguments(small_config(), tmp_path, "cpu", None, 1, True, one)
    assert args.logging_nan_inf_filter is False and args.eval_strategy == "steps"
    assert training_arguments(small_config(), tmp_path, "cpu", None, 1, False, one).eval_strategy == "no"


def test_train_without_validation(tiny_base, tokenizer, tmp_path):
    """format.val_size: 0 (or every validation row too long): no evaluation, said in the metrics."""
    tokenized = tokenized_split(tmp_path, tokenizer, 32, 32, 0, 0)
    metrics, _ = train(small_config(max_steps=2, report_to=[]), tiny_base, tokenized, tmp_path / "adapter",
                    tmp_path / "ckpt", None)
    assert metrics["steps"] == 2 and metrics["validation_rows"] == 0
    assert metrics["eval_loss"] is None and metrics["eval_perplexity"] is None
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_adapter_config_lists_its_sets_sorted(tmp_path):
    """peft writes a set in hash order, which changes from process to process; sorted, the same
    training writes the same adapter_config.json and dvc.lock does not churn."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from sabia_ift.train.training import sort_config_sets

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    targets = ["v_proj", "up_proj", "q_proj", "o_proj", "k_proj", "gate_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=2, target_modules=targets))
    assert isinstance(model.peft_config["default"].target_modules, set)
    sort_config_sets(model)
    model.save_pretrained(str(tmp_path))
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["target_modules"] == sorted(targets)


@pytest.mark.parametrize(
    ("overrides", "paths", "message"),
    [
        ({"grad_accum": 1}, {}, "train.grad_accum: 1 micro-batches per step cannot be split evenly over 3"),
        ({"precision": "fp16"}, {}, "train.precision: fp16 needs a CUDA GPU"),
        ({"attention": "varlen", "packing": True}, {}, "train.attention: varlen runs on CUDA"),
        ({"kernels": "liger"}, {}, "train.kernels: liger needs a CUDA GPU"),
        ({"loss_weighting": "rows", "lora": {"target_modules": ["q_proj", "lm_head"]}}, {},
         "train.loss_weighting: rows"),
        ({}, {"base": "missing-base"}, "missing-base: no such base model folder"),
        ({}, {"data": "missing-data"}, "missing-data: no tokenized data"),
    ],
    ids=["grad-accum", "fp16-on-cpu", "varlen-on-cpu", "liger-on-cpu", "rows-with-lm-head", "no-base", "no-data"],
)
def test_what_every_process_would_refuse_is_refused_before_launch(tiny_base, tokenized, tmp_path, overrides, paths,
                                                                   message):
    """Found in the processes, each printed it and torchrun added a traceback (exit 1)."""
    from sabia_ift.errors import SabiaError
    from sabia_ift.train.training import check_before_launch

    cfg = small_config(**{"device": "cpu", "devices": 3, "grad_accum": 3, **overrides})
    base = tmp_path / paths["base"] if "base" in paths else tiny_base
    data = tmp_path / paths["data"] if "data" in paths else tokenized
    with pytest.raises(SabiaError, match=message.replace(".", r"\.").replace("(", r"\(")):
        check_before_launch(cfg, 3, base, data)
    check_before_launch(small_config(device="cpu", devices=3, grad_accum=3), 3, tiny_base, tokenized)


def test_tensorboard_events_outlive_the_finished_run(tiny_base, tokenized, tmp_path, monkeypatch):
    """TensorBoard wrote under models/checkpoints, which a finished run empties: its events were deleted."""
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", "restored after the test")
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR")
    train(small_config(max_steps=2, logging_steps=1, report_to=["tensorboard"]), tiny_base, tokenized,
          tmp_path / "adapter", tmp_path / "ckpt", None, tmp_path / "logs")
    assert list((tmp_path / "ckpt").iterdir()) == []
    events = list((tmp_path / "logs" / "tensorboard").glob("*/events.out.tfevents.*"))
    # One run folder; the final evaluation after training opens a second event file in it.
    assert events and len({e.parent for e in events}) == 1 and all(e.stat().st_size > 0 for e in events)


def test_evaluation_asks_the_fused_loss_for_no_logits(tiny_base, tmp_path):
    """With Liger's fused loss applied by the stage, the final evaluation must ask it to skip the
    logits as training does: their fp32 copy is the peak that stopped an 8 GiB card."""
    import torch
    from transformers import AutoModelForCausalLM, TrainingArguments

    from sabia_ift.train.training import _make_trainer_class

    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    asked = []
    plain_forward = model.forward

    def forward(*args, skip_logits=None, **kwargs):  # what Liger's forward receives
        asked.append(skip_logits)
        return plain_forward(*args, **kwargs)

    model.forward = forward
    trainer = _make_trainer_class()(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[],
                                                                        use_cpu=True))
    batch = {"input_ids": torch.tensor([[1, 5, 9, 2]]), "labels": torch.tensor([[1, 5, 9, 2]])}
    trainer.prediction_step(model, batch, prediction_loss_only=True)
    trainer.eval_skips_logits = True
    loss, _, _ = trainer.prediction_step(model, batch, prediction_loss_only=True)
    trainer.prediction_step(model, batch, prediction_loss_only=False)  # logits wanted: not skipped
    assert asked == [None, True, None]
    assert torch.isfinite(loss)


@pytest.mark.parametrize("packing", [False, True])
def test_eval_loss_is_the_mean_over_trained_tokens(tiny_base, tokenized, tmp_path, packing):
    """The train stage's eval_loss is what the evaluate stage's val_loss computes for the same
    adapter: every trained token weighs alike, not every micro-batch (the val rows here fall into
    micro-batches of unequal token counts, where the Trainer's mean of means differs)."""
    from sabia_ift.artifacts import HF_SPLITS, load_tokenized
    from sabia_ift.evaluation.evaluation import token_loss
    from sabia_ift.modeling import load_tuned

    sizes = {"packing": True, "micro_batch_tokens": 1024} if packing else {}
    metrics, _ = train(small_config(max_steps=2, **sizes), tiny_base, tokenized, tmp_path / "adapter",
                       tmp_path / "ckpt", None)
    tokenizer, model = load_tuned(tiny_base, tmp_path / "adapter", "cpu")
    validation = load_tokenized(tokenized)[HF_SPLITS["val"]]
    assert metrics["eval_loss"] == pytest.approx(token_loss(model, tokenizer, validation, 4, "cpu"), abs=2e-5)
