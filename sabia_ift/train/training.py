"""Train stage: LoRA or QLoRA with the Hugging Face Trainer, resumable, packed, on one or more devices.

Results (losses, parameter counts, steps) and machine timings (speed, memory)
come back separately: the results are identical on every rerun of the same
inputs, so `dvc metrics diff` shows only what a change really did.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import resource
import shutil
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..artifacts import HF_SPLITS, TrainMeta, load_tokenized
from ..config import TrainConfig
from ..determinism import optimizer_name
from ..errors import DataError
from ..io import atomic_path, write_json
from ..model_card import save_adapter_extras
from ..modeling import (
    BaseRef,
    check_target_modules,
    load_model,
    load_tokenizer,
    model_folder,
    pick_device,
    pick_dtype,
    resolve_base,
)
from ..template import IGNORE_INDEX
from . import attention, distributed, hot_path, kernels, weighting
from .packing import CountingCollator, RowBatchSampler
from .progress import (
    progress_callbacks,
    project_curves,
    quiet_trainer_logs,
    show_tqdm,
    tracker_folders,
    trainer_report_to,
)

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
CHECKPOINT_PREFIX = "checkpoint-"


# --- checkpoints ------------------------------------------------------------------------------

def run_fingerprint(cfg: TrainConfig, base_dir: Path, tokenized_dir: Path, world_size: int) -> str:
    """Identifies what a checkpoint was trained on, so a resume never mixes two runs.

    The number of processes is part of it: each process's data order and RNG
    state are in the checkpoint, so a run on another number of devices starts over.
    """
    digest = hashlib.sha256(json.dumps({**cfg.model_dump(), "world_size": world_size}, sort_keys=True).encode())
    for root, pattern in ((base_dir, "*.json"), (tokenized_dir, "*")):
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


def prepare_checkpoints(checkpoint_dir: Path, fingerprint: str, world_size: int = 1) -> Path | None:
    """The checkpoint to resume from, after clearing anything that belongs to another run."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    run_file = checkpoint_dir / RUN_FILE
    recorded = json.loads(run_file.read_text()) if run_file.is_file() else None
    same_run = recorded is not None and recorded["fingerprint"] == fingerprint
    keep = complete_checkpoints(checkpoint_dir) if same_run else []
    if recorded is not None and not same_run and complete_checkpoints(checkpoint_dir):
        log.warning("models/checkpoints holds checkpoints of another configuration, data or number of devices "
                    "(was %s processes): starting from step 0", recorded.get("world_size", "?"))
    resume = keep[-1] if keep else None
    for path in checkpoint_dir.iterdir():
        if path != resume and path != run_file:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    if not same_run:
        write_json(run_file, {"fingerprint": fingerprint, "world_size": world_size})
    return resume


def clear_checkpoints(checkpoint_dir: Path) -> None:
    """A finished run leaves nothing that could change the next one."""
    for path in checkpoint_dir.iterdir():
        shutil.rmtree(path) if path.is_dir() else path.unlink()


# --- model and trainer ------------------------------------------------------------------------

def build_model(cfg: TrainConfig, folder: Path, device: str, dtype, attn_implementation: str = "sdpa"):
    """Base model (4-bit when asked) with LoRA adapters attached.

    peft's prepare_model_for_kbit_training is not used: it upcasts the
    embeddings and lm_head to fp32 (about 1 GB more at 7B, for fp16 stability
    that bf16 does not need).
    """
    from peft import LoraConfig, get_peft_model

    hot_path.before_load(cfg, device)
    model = load_model(folder, quantization=cfg.quantization, double_quant=cfg.double_quant,
                       dtype=dtype, device=device, attn_implementation=attn_implementation)
    check_target_modules(model, cfg.lora.target_modules)
    weighting.check_targets(cfg.loss_weighting, cfg.lora.target_modules)
    offload = hot_path.before_lora(model, cfg)
    model.config.use_cache = False
    lora = LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules), bias="none", task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    hot_path.after_lora(model, cfg, offload)
    return model


def _make_trainer_class():
    from torch.utils.data import DataLoader
    from transformers import Trainer

    class EpochLoader(DataLoader):
        """A DataLoader over a batch sampler that learns the epoch, for the epoch's shuffle."""

        def set_epoch(self, epoch: int) -> None:
            sampler: Any = self.batch_sampler
            sampler.set_epoch(epoch)

    class PipelineTrainer(Trainer):
        """The Trainer with this stage's batches (packed or padded, rank-aware, nothing
        dropped or repeated), evaluation kept out of the token counts, and the cost
        of each checkpoint save recorded."""

        sampler: RowBatchSampler
        save_seconds: list[float]
        checkpoint_bytes: int | None = None
        row_weighting: weighting.RowWeighting | None = None
        eval_skips_logits = False
        eval_sums: list | None = None  # [loss x tokens, tokens] of the evaluation running now

        def get_train_dataloader(self):
            # Already sharded by rank: not passed through accelerate's re-sharding.
            return EpochLoader(self.train_dataset, batch_sampler=self.sampler, collate_fn=self.data_collator,
                               num_workers=0, pin_memory=self.args.dataloader_pin_memory)

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            # An optimizer step's micro-batches arrive together here: the only place that
            # sees the step's rows and tokens before its first forward pass.
            batches, items = super().get_batch_samples(epoch_iterator, num_batches, device)
            if self.row_weighting is not None:
                gather = ((lambda tokens: self.accelerator.gather(tokens.to(device)).sum(0, keepdim=True).cpu())
                          if self.args.world_size > 1 else None)
                weighting.weigh_step(batches, self.row_weighting.rows_per_step, gather)
            return batches, items

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.eval_sums is not None:
                # In evaluation the Trainer divides each process's loss by the tokens of every
                # process (and scales it back by their number); evaluation_loop sums each
                # micro-batch's own token mean times its own tokens instead.
                num_items_in_batch = None
            if self.row_weighting is None:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.row_weighting.weights = inputs.pop(weighting.KEY, None)
            try:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            finally:
                self.row_weighting.weights = None

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            if self.eval_skips_logits and prediction_loss_only and "labels" in inputs:
                # Liger's fused loss skips the logits in training mode only unless asked; in
                # evaluation it builds the micro-batch's fp32 logits (16,384 x 32,000 x 4 bytes
                # = 1.95 GiB), the allocation that stopped an 8 GiB card after its last step.
                # The Trainer asks only when it applied Liger itself; this stage applies it.
                inputs = {**inputs, "skip_logits": True}
            loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
            if loss is not None and self.eval_sums is not None and "labels" in inputs:
                # The loss is this micro-batch's mean over its own trained tokens (compute_loss;
                # the model shifts the labels by one, and so does this count).
                tokens = int((inputs["labels"][..., 1:] != IGNORE_INDEX).sum())
                self.eval_sums[0] += float(loss) * tokens
                self.eval_sums[1] += tokens
            return loss, logits, labels

        def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                            metric_key_prefix="eval"):
            # The Trainer's eval loss is the mean of the micro-batches' means: a micro-batch of few
            # trained tokens weighs as much as one of many. It becomes the mean over every trained
            # token, as the train loss and the evaluate stage's val_loss are. Under DDP, the rows
            # accelerate repeats to even out the processes' last batches are counted again.
            self.eval_sums = [0.0, 0]
            try:
                output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                                 metric_key_prefix)
                total, tokens = self.eval_sums
            finally:
                self.eval_sums = None
            if self.args.world_size > 1:
                import torch

                sums = torch.tensor([total, float(tokens)], dtype=torch.float64, device=self.args.device)
                total, tokens = self.accelerator.reduce(sums, reduction="sum").tolist()
            key = f"{metric_key_prefix}_loss"
            if tokens and key in output.metrics:
                output.metrics[key] = total / tokens
            return output

        def evaluate(self, *args, **kwargs):
            self.data_collator.counting = False
            try:
                return super().evaluate(*args, **kwargs)
            finally:
                self.data_collator.counting = True

        def _save(self, output_dir=None, state_dict=None):
            super()._save(output_dir, state_dict=adapter_state(self.model) if state_dict is None else state_dict)

        def _save_checkpoint(self, model, trial):
            start = time.perf_counter()
            super()._save_checkpoint(model, trial)
            self.save_seconds = [*getattr(self, "save_seconds", []), time.perf_counter() - start]
            folder = Path(self.args.output_dir) / f"{CHECKPOINT_PREFIX}{self.state.global_step}"
            if folder.is_dir():
                self.checkpoint_bytes = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())

    return PipelineTrainer


def training_arguments(cfg: TrainConfig, checkpoint_dir: Path, device: str, dtype, grad_accum: int,
                       has_eval: bool, world: distributed.World):
    import torch
    from transformers import TrainingArguments

    warmup: int | float = int(cfg.warmup) if cfg.warmup >= 1 else cfg.warmup
    args = TrainingArguments(
        output_dir=str(checkpoint_dir),
        per_device_train_batch_size=cfg.micro_batch_size,
        per_device_eval_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=grad_accum,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=warmup,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=optimizer_name(cfg.optim, device),
        bf16=device == "cuda" and dtype == torch.bfloat16,
        fp16=device == "cuda" and dtype == torch.float16,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        logging_nan_inf_filter=False,  # NonFiniteLossGuard must see a NaN loss, not the running mean
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
        # The loss of a step is divided by its trained tokens over every process (the
        # transformers default, relied on by train.loss_weighting: rows).
        average_tokens_across_devices=True,
        # Only LoRA weights train; every one of them gets a gradient each step.
        ddp_find_unused_parameters=False,
        ddp_backend=("gloo" if device == "cpu" else "nccl") if world.size > 1 else None,
        report_to=trainer_report_to(cfg.report_to) if world.is_main else "none",
        disable_tqdm=not show_tqdm(),
        # Checkpointing is set up on the model in build_model; the Trainer must not redo it.
    )
    if world.size == 1 and args.n_gpu > 1:
        # One process on a machine with several GPUs: the Trainer would wrap the model in
        # DataParallel, which splits nothing of a packed row yet rescales the loss by the GPU
        # count. Several GPUs are used through train.devices (DDP) instead.
        args._n_gpu = 1
    return args


# --- the stage --------------------------------------------------------------------------------

@dataclass
class Setup:
    """What the stage resolved before training: where, in what precision, on how many processes."""

    device: str
    dtype: Any
    world: distributed.World
    grad_accum: int
    attention: str


def check(cfg: TrainConfig, world_size: int) -> tuple[str, int, str]:
    """Device, micro-batches per process and attention, after every check of `train` that
    needs neither the model nor a GPU context (the launcher runs it; it must not hold one)."""
    device = pick_device(cfg.device, "train.device")
    if device == "cpu":
        pick_dtype(cfg.precision, device)  # on CUDA, asking for bf16 support starts a GPU context
    grad_accum = distributed.accumulation_per_process(cfg.grad_accum, world_size)
    attn_implementation = attention.attention_implementation(cfg.attention, cfg.packing, device)
    if cfg.kernels == "liger":
        kernels.check_liger(device)
    weighting.check_targets(cfg.loss_weighting, cfg.lora.target_modules)
    trainer_report_to(cfg.report_to)
    return device, grad_accum, attn_implementation


def check_before_launch(cfg: TrainConfig, processes: int, base_dir: str | Path, tokenized_dir: str | Path) -> None:
    """What the stage checks before torchrun starts `processes` processes.

    A mistake found in the processes is printed by each of them, then torchrun
    adds a traceback of its own and exits 1: found here, it is one line and exit 2.
    """
    check(cfg, processes)
    resolve_base(base_dir)
    load_splits(Path(tokenized_dir))


def setup(cfg: TrainConfig) -> Setup:
    import torch

    world = distributed.current_world()
    device, grad_accum, attention = check(cfg, world.size)
    if device == "cuda":
        torch.cuda.set_device(world.local_rank)
    dtype = pick_dtype(cfg.precision, device)
    if device == "cuda" and dtype == torch.float16:
        why = "this GPU has no bf16" if cfg.precision == "auto" else "train.precision: fp16"
        log.warning("%s: training in fp16 with loss scaling", why)
    if cfg.quantization == "nf4" and device == "cpu":
        log.warning("4-bit on CPU: bitsandbytes' CPU kernels, with the inference repack turned off "
                    "so LoRA keeps its gradients after evaluations (slow; meant for tests)")
    return Setup(device, dtype, world, grad_accum, attention)


def load_splits(tokenized_dir: Path):
    """The train split and the validation split (None when format.val_size is 0)."""
    data = load_tokenized(tokenized_dir)
    train_set = data.get(HF_SPLITS["train"])
    if train_set is None or len(train_set) == 0:
        raise DataError(f"{tokenized_dir}: the train split is empty; see metrics/tokenize.json")
    val = data.get(HF_SPLITS["val"])
    return train_set, (val if val is not None and len(val) else None)


def adapter_state(model) -> dict:
    """The trainable (LoRA) weights by name: all an adapter or a checkpoint holds.

    Passed to save_pretrained so it never builds the whole model's state dict,
    which for a 4-bit base packs every layer's quantisation state on the GPU:
    measured on an NVIDIA H100 80GB at 7B, 2.5 GiB over the training peak.
    """
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


def sort_config_sets(model) -> None:
    """peft keeps target_modules as a set and writes it as a list in hash order, which changes
    from one process to the next: sorted, the same training writes the same adapter_config.json,
    and `dvc.lock` does not churn."""
    for config in model.peft_config.values():
        for field in fields(config):
            value = getattr(config, field.name)
            if isinstance(value, set):
                setattr(config, field.name, sorted(value))


def save_adapter(model, tokenizer, adapter_dir: str | Path, cfg: TrainConfig, ref: BaseRef) -> None:
    """A PEFT adapter folder any PEFT user can load, with its tokenizer and model card."""
    base = {"name_or_path": ref.name_or_path, "revision": ref.revision}
    sort_config_sets(model)
    with atomic_path(adapter_dir, is_dir=True) as tmp:
        model.save_pretrained(str(tmp), state_dict=adapter_state(model))
        save_adapter_extras(tmp, tokenizer, cfg.model_dump(mode="json"), base)
        TrainMeta(quantization=cfg.quantization, double_quant=cfg.double_quant, precision=cfg.precision,
                  base=base).write(tmp)


def _peak_memory(device: str) -> dict[str, float]:
    import torch

    if device == "cuda":
        return {"peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3)}
    # ru_maxrss is KiB on Linux: the process's peak resident memory.
    return {"peak_memory_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}


def train(cfg: TrainConfig, base_dir: str | Path, tokenized_dir: str | Path, adapter_dir: str | Path,
          checkpoint_dir: str | Path, live_dir: str | Path | None,
          logs_dir: str | Path | None = None) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Run the train stage: (results, timings) on the main process, None on the others.

    `logs_dir` is where the Trainer's trackers (TensorBoard, W&B) write, outside the checkpoints.
    """
    import torch
    from transformers import set_seed

    from .callbacks import LiveCurves, StepTimer
    from .guards import NonFiniteLossGuard

    base_dir, tokenized_dir, checkpoint_dir = Path(base_dir), Path(tokenized_dir), Path(checkpoint_dir)
    run = setup(cfg)  # a tracker that is not installed fails here, before the model loads
    world = run.world
    set_seed(cfg.seed)

    ref = resolve_base(base_dir)
    folder = model_folder(ref)
    tokenizer = load_tokenizer(folder)
    model = build_model(cfg, folder, run.device, run.dtype, run.attention)
    # Name the base as users know it (Hub id or folder), not this machine's cache path.
    model.peft_config["default"].base_model_name_or_path = ref.name_or_path
    model.peft_config["default"].revision = ref.revision
    if world.is_main:
        model.print_trainable_parameters()
    trainable, total = model.get_nb_trainable_parameters()
    train_set, val_set = load_splits(tokenized_dir)
    if val_set is None:
        log.warning("no validation split: training runs without evaluation (eval_loss is null in the metrics)")

    collator = CountingCollator(tokenizer, packing=cfg.packing, varlen=run.attention == attention.VARLEN,
                                pad_to_multiple_of=8 if run.device == "cuda" else None)
    sampler = RowBatchSampler(train_set["length"], packing=cfg.packing, micro_batch_size=cfg.micro_batch_size,
                              micro_batch_tokens=cfg.micro_batch_tokens, by_length=cfg.group_by_length,
                              seed=cfg.seed, per_step=cfg.grad_accum, world_size=world.size,
                              rank=world.rank)

    args = training_arguments(cfg, checkpoint_dir, run.device, run.dtype, run.grad_accum, val_set is not None,
                              world)
    fingerprint = run_fingerprint(cfg, base_dir, tokenized_dir, world.size)
    # One process clears stale checkpoints; the others wait, then read what it kept.
    with args.main_process_first(local=False, desc="checkpoints"):
        if world.is_main:
            resume = prepare_checkpoints(checkpoint_dir, fingerprint, world.size)
        else:
            found = complete_checkpoints(checkpoint_dir)
            resume = found[-1] if found else None
    if resume is not None and world.is_main:
        log.warning("resuming from %s", resume)

    timer = StepTimer(collator)
    # The guard comes first, so a non-finite loss never reaches the curves.
    callbacks = [NonFiniteLossGuard(cfg.lr), timer, *(progress_callbacks() if world.is_main else [])]
    if project_curves(cfg.report_to) and live_dir is not None and world.is_main:
        callbacks.append(LiveCurves(Path(live_dir)))
    if logs_dir is not None and world.is_main:
        tracker_folders(cfg.report_to, logs_dir)  # read when the Trainer builds its trackers
    trainer = _make_trainer_class()(
        model=model, args=args, train_dataset=train_set, eval_dataset=val_set, data_collator=collator,
        processing_class=tokenizer, callbacks=callbacks,
    )
    trainer.sampler = sampler
    trainer.eval_skips_logits = cfg.kernels == "liger"
    quiet_trainer_logs(trainer)
    if cfg.loss_weighting == "rows":
        rows_per_step = weighting.rows_per_step(len(train_set), len(sampler.batches(0)), cfg.grad_accum)
        trainer.row_weighting = weighting.RowWeighting(rows_per_step)
        trainer.row_weighting.attach(model.get_base_model().model)
    load_peak = _peak_memory(run.device)
    if run.device == "cuda":
        # The peak of training itself: weights and everything a step allocates, not loading spikes.
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    runtime = time.perf_counter() - start
    memory: dict[str, float | None] = {**_peak_memory(run.device)}
    if run.device == "cuda":
        memory["peak_memory_gib"] = round(max(memory["peak_memory_gib"] or 0.0, timer.peak_all_gib), 3)
        memory["peak_step_memory_gib"] = timer.peak_step_gib
    final_eval = trainer.evaluate() if val_set is not None else {}

    # Tokens are summed over processes; the slowest process's clock sets the pace.
    inputs, trained, rows = distributed.all_reduce_sum(
        [collator.input_tokens, collator.trained_tokens, collator.rows], run.device)
    steady_inputs, steady_trained = distributed.all_reduce_sum([timer.inputs, timer.trained], run.device)
    if not world.is_main:
        return None
    save_adapter(model, tokenizer, adapter_dir, cfg, ref)
    clear_checkpoints(checkpoint_dir)
    # What a card must hold for the whole stage (loading, steps, final evaluation, saving),
    # beside the training peak above: the figure that says whether a run fits a smaller card.
    memory.update({f"stage_{key}": max(value or 0.0, load_peak.get(key) or 0.0)
                   for key, value in _peak_memory(run.device).items()})

    # From the log history, which a resumed run restores from its checkpoint:
    # the Trainer's own training_loss would only average the steps since resuming.
    logged = [e for e in trainer.state.log_history if "loss" in e]
    losses = [e["loss"] for e in logged]
    eval_loss = float(final_eval["eval_loss"]) if final_eval else None
    saves = getattr(trainer, "save_seconds", [])
    results = {
        "train_loss": round(sum(losses) / len(losses), 6) if losses else None,
        "final_train_loss": round(float(losses[-1]), 6) if losses else None,
        "first_train_loss": round(float(losses[0]), 6) if losses else None,
        "eval_loss": round(eval_loss, 6) if eval_loss is not None else None,
        "eval_perplexity": round(math.exp(eval_loss), 4) if eval_loss is not None else None,
        "trainable_params": int(trainable),
        "total_params": int(total),
        "steps": int(trainer.state.global_step),
        "epochs": round(float(trainer.state.epoch or 0), 4),
        "train_rows": len(train_set),
        "validation_rows": len(val_set) if val_set is not None else 0,
        "resumed_from_step": int(resume.name.removeprefix(CHECKPOINT_PREFIX)) if resume else 0,
    }
    timings = {
        "device": run.device,
        "processes": world.size,
        "dtype": str(run.dtype).removeprefix("torch."),
        "attention": run.attention,
        "global_batch": {"micro_batches_per_process": run.grad_accum, "processes": world.size,
                         **({"tokens": cfg.micro_batch_tokens * cfg.grad_accum} if cfg.packing
                            else {"rows": cfg.micro_batch_size * cfg.grad_accum})},
        "rows_seen": int(rows),
        "runtime_s": round(runtime, 2),
        "input_tokens_per_s": round(inputs / runtime, 1),
        "trained_tokens_per_s": round(trained / runtime, 1),
        "step_time_s": round(timer.seconds / timer.steps, 4) if timer.steps else None,
        "steady_input_tokens_per_s": round(steady_inputs / timer.seconds, 1) if timer.steps else None,
        "steady_trained_tokens_per_s": round(steady_trained / timer.seconds, 1) if timer.steps else None,
        # Every logged train loss by step: what bench/side_by_side.py's curve rows compare.
        "train_loss_by_step": {str(e["step"]): e["loss"] for e in logged},
        "checkpoint_saves": len(saves),
        "checkpoint_save_s": round(sum(saves) / len(saves), 3) if saves else None,
        "checkpoint_mb": round(trainer.checkpoint_bytes / 2**20, 3) if trainer.checkpoint_bytes else None,
        **memory,
    }
    return results, timings
