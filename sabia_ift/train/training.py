"""Train stage: LoRA or QLoRA with the Hugging Face Trainer, resumable, with DVCLive curves."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import resource
import shutil
import time
from pathlib import Path
from typing import Any

from ..artifacts import HF_SPLITS, TrainMeta
from ..config import TrainConfig
from ..errors import DataError
from ..io import atomic_path, write_json
from ..modeling import (
    check_target_modules,
    load_model,
    load_tokenizer,
    model_folder,
    pick_device,
    pick_dtype,
    resolve_base,
)
from ..template import IGNORE_INDEX

log = logging.getLogger(__name__)

# Keys of metrics/train.json that measure the machine, not the run: they differ
# between two otherwise identical runs.
TIMING_KEYS = frozenset({
    "runtime_s", "input_tokens_per_s", "trained_tokens_per_s", "step_time_s", "steady_input_tokens_per_s",
    "steady_trained_tokens_per_s", "peak_memory_gib", "peak_reserved_gib", "checkpoint_save_s",
})
RUN_FILE = "run.json"
CHECKPOINT_PREFIX = "checkpoint-"


def run_fingerprint(cfg: TrainConfig, base_dir: Path, tokenized_dir: Path) -> str:
    """Identifies what a checkpoint was trained on, so a resume never mixes two runs."""
    digest = hashlib.sha256(json.dumps(cfg.model_dump(), sort_keys=True).encode())
    inputs = [(base_dir, "*.json"), (tokenized_dir, "*")]
    for root, pattern in inputs:
        for path in sorted(root.rglob(pattern)):
            if path.is_file():
                digest.update(str(path.relative_to(root)).encode())
                digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def complete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Checkpoints in step order whose trainer state was written (the Trainer writes it last)."""
    found = []
    for path in checkpoint_dir.glob(f"{CHECKPOINT_PREFIX}*"):
        step = path.name.removeprefix(CHECKPOINT_PREFIX)
        if step.isdigit() and (path / "trainer_state.json").is_file():
            found.append((int(step), path))
    return [path for _, path in sorted(found)]


def prepare_checkpoints(checkpoint_dir: Path, fingerprint: str) -> Path | None:
    """The checkpoint to resume from, after clearing anything that belongs to another run."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    run_file = checkpoint_dir / RUN_FILE
    same_run = run_file.is_file() and json.loads(run_file.read_text())["fingerprint"] == fingerprint
    keep = complete_checkpoints(checkpoint_dir) if same_run else []
    resume = keep[-1] if keep else None
    for path in checkpoint_dir.iterdir():
        if path != resume and path != run_file:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    if not same_run:
        write_json(run_file, {"fingerprint": fingerprint})
    return resume


def clear_checkpoints(checkpoint_dir: Path) -> None:
    """A finished run leaves nothing that could change the next one."""
    for path in checkpoint_dir.iterdir():
        shutil.rmtree(path) if path.is_dir() else path.unlink()


class CountingCollator:
    """Dynamic padding that also counts what training really used: non-pad input
    tokens and trained label tokens.

    Counting here, on the CPU tensors, costs no GPU synchronisation; counting
    in the training step would stall the GPU queue every micro-batch.
    """

    def __init__(self, collate) -> None:
        self.collate = collate
        self.counting = True
        self.input_tokens = 0
        self.trained_tokens = 0

    def __call__(self, features):
        batch = self.collate(features)
        if self.counting:
            self.input_tokens += int(batch["attention_mask"].sum())
            self.trained_tokens += int((batch["labels"] != IGNORE_INDEX).sum())
        return batch


def _make_trainer_class():
    from transformers import Trainer

    class CountingTrainer(Trainer):
        """Keeps evaluation batches out of the token counts, and records what
        resumability costs (seconds per checkpoint save, checkpoint size)."""

        save_seconds: list[float]
        checkpoint_bytes: int | None = None

        def evaluate(self, *args, **kwargs):
            self.data_collator.counting = False
            try:
                return super().evaluate(*args, **kwargs)
            finally:
                self.data_collator.counting = True

        def _save_checkpoint(self, model, trial):
            start = time.perf_counter()
            super()._save_checkpoint(model, trial)
            self.save_seconds = [*getattr(self, "save_seconds", []), time.perf_counter() - start]
            folder = Path(self.args.output_dir) / f"{CHECKPOINT_PREFIX}{self.state.global_step}"
            self.checkpoint_bytes = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())

    return CountingTrainer


def _make_live_callback(live_dir: Path):
    from dvclive import Live
    from transformers import TrainerCallback

    names = {"loss": "train/loss", "learning_rate": "train/lr", "grad_norm": "train/grad_norm",
             "eval_loss": "eval/loss"}

    class LiveCurves(TrainerCallback):
        """Training curves for `dvc plots`, rebuilt from the Trainer's log history.

        On a resumed run the history comes back from the checkpoint, so the
        curves cover the whole run, not just the part after the interruption.
        No timestamps: the files are identical on every rerun.
        """

        def __init__(self) -> None:
            self.live = None

        def _log(self, step: int, logs: dict[str, Any]) -> None:
            wrote = False
            for key, name in names.items():
                if key in logs and isinstance(logs[key], (int, float)):
                    self.live.step = step
                    self.live.log_metric(name, float(logs[key]))
                    wrote = True
            if wrote:
                self.live.make_summary()

        def on_train_begin(self, args, state, control, **kwargs):
            if live_dir.exists():
                shutil.rmtree(live_dir)
            self.live = Live(str(live_dir), dvcyaml=False, save_dvc_exp=False, report=None)
            for entry in state.log_history:
                self._log(entry.get("step", 0), entry)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.live is not None and logs:
                self._log(state.global_step, logs)

    return LiveCurves()


def _make_step_timer(counts: CountingCollator):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Steady-state speed: wall time and tokens between optimizer steps.

        The first step (warm-up, and the longest batch, which the length-grouped
        sampler puts first) and evaluation pauses are left out.
        """

        def __init__(self) -> None:
            self.last: tuple[float, int, int] | None = None
            self.seconds, self.inputs, self.trained, self.steps = 0.0, 0, 0, 0
            self.first_done = False

        def _mark(self) -> tuple[float, int, int]:
            return time.perf_counter(), counts.input_tokens, counts.trained_tokens

        def on_step_end(self, args, state, control, **kwargs):
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

        def summary(self) -> dict[str, float | None]:
            if not self.steps:
                return {"step_time_s": None, "steady_input_tokens_per_s": None, "steady_trained_tokens_per_s": None}
            return {"step_time_s": round(self.seconds / self.steps, 4),
                    "steady_input_tokens_per_s": round(self.inputs / self.seconds, 1),
                    "steady_trained_tokens_per_s": round(self.trained / self.seconds, 1)}

    return StepTimer()


def _peak_memory(device: str) -> dict[str, float]:
    import torch

    if device == "cuda":
        return {"peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3)}
    # ru_maxrss is KiB on Linux: the process's peak resident memory.
    return {"peak_memory_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}


def build_model(cfg: TrainConfig, folder: Path, device: str, dtype):
    """Base model (4-bit when asked) with LoRA adapters attached.

    peft's prepare_model_for_kbit_training is not used: it upcasts the
    embeddings and lm_head to fp32 (about 1 GB more at 7B, for fp16 stability
    that bf16 does not need), which would break the 6 GiB budget at micro-batch 1.
    """
    from peft import LoraConfig, get_peft_model

    model = load_model(folder, quantization=cfg.quantization, double_quant=cfg.double_quant,
                       dtype=dtype, device=device)
    check_target_modules(model, cfg.lora.target_modules)
    if cfg.activation_checkpointing:
        # Non-reentrant: the reentrant variant needs inputs that require grad,
        # which frozen embeddings do not give.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    lora = LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules), bias="none", task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def training_arguments(cfg: TrainConfig, checkpoint_dir: Path, device: str, dtype):
    import torch
    from transformers import TrainingArguments

    warmup: int | float = int(cfg.warmup) if cfg.warmup >= 1 else cfg.warmup
    return TrainingArguments(
        output_dir=str(checkpoint_dir),
        per_device_train_batch_size=cfg.micro_batch_size,
        per_device_eval_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=warmup,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optim,
        bf16=device == "cuda" and dtype == torch.bfloat16,
        fp16=device == "cuda" and dtype == torch.float16,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        eval_strategy="steps",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=device == "cpu",
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        dataloader_num_workers=0,
        report_to="none",
        disable_tqdm=True,
        # Checkpointing is set up on the model in build_model; the Trainer must not redo it.
    )


def train(cfg: TrainConfig, base_dir: str | Path, tokenized_dir: str | Path, adapter_dir: str | Path,
          checkpoint_dir: str | Path, live_dir: str | Path | None) -> dict[str, Any]:
    """Run the train stage; returns the metrics written to metrics/train.json."""
    import datasets
    import torch
    from transformers import DataCollatorForSeq2Seq, set_seed

    base_dir, tokenized_dir = Path(base_dir), Path(tokenized_dir)
    checkpoint_dir = Path(checkpoint_dir)
    device = pick_device(cfg.device, "train.device")
    dtype = pick_dtype(cfg.precision, device)
    if device == "cuda" and dtype == torch.float16:
        why = "this GPU has no bf16" if cfg.precision == "auto" else "train.precision: fp16"
        log.warning("%s: training in fp16 with loss scaling", why)
    if cfg.quantization == "nf4" and device == "cpu":
        log.warning("4-bit on CPU: bitsandbytes' CPU kernels, with the inference repack turned off "
                    "so LoRA keeps its gradients after evaluations (slow; meant for tests)")
    set_seed(cfg.seed)

    ref = resolve_base(base_dir)
    folder = model_folder(ref)
    tokenizer = load_tokenizer(folder)
    model = build_model(cfg, folder, device, dtype)
    # Name the base as users know it (Hub id or folder), not this machine's cache path.
    model.peft_config["default"].base_model_name_or_path = ref.name_or_path
    model.peft_config["default"].revision = ref.revision
    model.print_trainable_parameters()
    trainable, total = model.get_nb_trainable_parameters()

    try:
        data = datasets.load_from_disk(str(tokenized_dir))
    except FileNotFoundError:
        raise DataError(f"{tokenized_dir}: no tokenized data; run the tokenize stage first") from None
    if len(data[HF_SPLITS["train"]]) == 0:
        raise DataError(f"{tokenized_dir}: the train split is empty; see metrics/tokenize.json")
    collator = CountingCollator(DataCollatorForSeq2Seq(
        tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX,
        pad_to_multiple_of=8 if device == "cuda" else None, return_tensors="pt",
    ))

    resume = prepare_checkpoints(checkpoint_dir, run_fingerprint(cfg, base_dir, tokenized_dir))
    if resume is not None:
        log.warning("resuming from %s", resume)
    timer = _make_step_timer(collator)
    callbacks = [timer]
    if cfg.live and live_dir is not None:
        callbacks.append(_make_live_callback(Path(live_dir)))
    trainer = _make_trainer_class()(
        model=model,
        args=training_arguments(cfg, checkpoint_dir, device, dtype),
        train_dataset=data[HF_SPLITS["train"]],
        eval_dataset=data[HF_SPLITS["val"]],
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    if device == "cuda":
        # The peak of training itself: weights and everything a step allocates, not loading spikes.
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    runtime = time.perf_counter() - start
    final_eval = trainer.evaluate()

    with atomic_path(adapter_dir, is_dir=True) as tmp:
        model.save_pretrained(str(tmp))
        TrainMeta(quantization=cfg.quantization, double_quant=cfg.double_quant, precision=cfg.precision,
                  base={"name_or_path": ref.name_or_path, "revision": ref.revision}).write(tmp)
    clear_checkpoints(checkpoint_dir)

    # From the log history, which a resumed run restores from its checkpoint:
    # the Trainer's own training_loss would only average the steps since resuming.
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    saves = getattr(trainer, "save_seconds", [])
    eval_loss = float(final_eval["eval_loss"])
    return {
        "train_loss": round(sum(losses) / len(losses), 6) if losses else None,
        "final_train_loss": round(float(losses[-1]), 6) if losses else None,
        "first_train_loss": round(float(losses[0]), 6) if losses else None,
        "eval_loss": round(eval_loss, 6),
        "eval_perplexity": round(math.exp(eval_loss), 4),
        "trainable_params": int(trainable),
        "total_params": int(total),
        "trainable_percent": round(100 * trainable / total, 4),
        "steps": int(trainer.state.global_step),
        "epochs": round(float(trainer.state.epoch or 0), 4),
        "train_rows": len(data[HF_SPLITS["train"]]),
        "resumed_from_step": int(resume.name.removeprefix(CHECKPOINT_PREFIX)) if resume else 0,
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "quantization": cfg.quantization,
        # Timings and memory vary run to run; everything above is deterministic on CPU.
        "runtime_s": round(runtime, 2),
        "input_tokens_per_s": round(collator.input_tokens / runtime, 1),
        "trained_tokens_per_s": round(collator.trained_tokens / runtime, 1),
        **timer.summary(),
        "checkpoint_saves": len(saves),
        "checkpoint_save_s": round(sum(saves) / len(saves), 3) if saves else None,
        "checkpoint_mb": round(trainer.checkpoint_bytes / 2**20, 3) if trainer.checkpoint_bytes else None,
        **_peak_memory(device),
    }
