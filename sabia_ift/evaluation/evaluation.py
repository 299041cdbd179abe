"""Evaluate stage: the base model and the tuned one, side by side, on the same prompts.

One base model is loaded; the tuned model is the same weights with the LoRA
adapter switched on, so both are measured with identical loading, precision
and decoding. Metrics per model: EOS-stop rate, repetition, ROUGE-L, chrF,
exact match, mean new tokens, and loss/perplexity on the validation split.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

from ..config import EvaluateConfig
from ..errors import DataError
from .generation import Generation, generate
from ..io import read_jsonl, write_jsonl
from .metrics import load_metric
from ..artifacts import HF_SPLITS, split_file
from ..modeling import load_tuned, pick_device
from ..template import IGNORE_INDEX, encode_prompt
from ..text import normalize_text

def token_loss(model, tokenizer, dataset, batch_size: int, device: str) -> float:
    """Mean loss per trained token (response and EOS), weighted by tokens, not by batch."""
    import torch
    from transformers import DataCollatorForSeq2Seq

    collate = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX,
                                     return_tensors="pt")
    rows = dataset.remove_columns([c for c in dataset.column_names if c not in ("input_ids", "labels")])
    total, count = 0.0, 0
    model.eval()
    for start in range(0, len(rows), batch_size):
        batch = collate([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.size(-1)), labels.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum",
        )
        total += float(losses)
        count += int((labels != IGNORE_INDEX).sum())
    return total / count if count else float("nan")


def score(generations: list[Generation], references: list[str], ngram: int) -> dict[str, float]:
    predictions = [g.text for g in generations]
    rouge = load_metric("rouge_l").compute(predictions=predictions, references=references)
    chrf = load_metric("chrf").compute(predictions=predictions, references=references)
    repetition = load_metric("repetition").compute(predictions=predictions, n=ngram)
    n = len(generations)
    return {
        "eos_stop_rate": round(sum(g.stopped for g in generations) / n, 4),
        "repetition": round(repetition["repetition"], 4),
        "rougeL": round(rouge["rougeL"], 4),
        "chrf": round(chrf["chrf"], 4),
        "exact_match": round(sum(normalize_text(p) == normalize_text(r)
                                 for p, r in zip(predictions, references)) / n, 4),
        "mean_new_tokens": round(sum(g.new_tokens for g in generations) / n, 2),
    }


def evaluate(cfg: EvaluateConfig, base_dir: str | Path, adapter_dir: str | Path, formatted_dir: str | Path,
             tokenized_dir: str | Path, samples_path: str | Path) -> dict[str, Any]:
    """Run the evaluate stage; returns metrics/eval.json's content and writes the samples file."""
    import datasets
    import torch
    from transformers import set_seed

    set_seed(0)
    device = pick_device(cfg.device, "evaluate.device")
    tokenizer, model = load_tuned(base_dir, adapter_dir, device)
    rows = read_jsonl(split_file(formatted_dir, "test"))
    if cfg.max_samples is not None:
        rows = rows[: cfg.max_samples]
    if not rows:
        raise DataError(f"{formatted_dir}/test.jsonl: the test split is empty; raise format.test_size")
    prompts = [encode_prompt(tokenizer, row["prompt"]) for row in rows]
    references = [row["response"] for row in rows]
    validation = datasets.load_from_disk(str(tokenized_dir))[HF_SPLITS["val"]]

    results, outputs = {}, {}
    for name in ("base", "tuned"):
        # The base model is the same weights with the adapter switched off.
        switch = model.disable_adapter() if name == "base" else contextlib.nullcontext()
        with switch, torch.inference_mode():
            gens = generate(model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
                            batch_size=cfg.batch_size, device=device)
            loss = token_loss(model, tokenizer, validation, cfg.batch_size, device) if len(validation) else float("nan")
        outputs[name] = gens
        results[name] = {**score(gens, references, cfg.repetition_ngram),
                         "val_loss": round(loss, 6),
                         "val_perplexity": round(math.exp(loss), 4) if math.isfinite(loss) else None}

    write_jsonl(samples_path, (
        {"source_row": row["source_row"], "prompt": row["prompt"], "reference": ref,
         "base": b.text, "base_stopped": b.stopped, "tuned": t.text, "tuned_stopped": t.stopped}
        for row, ref, b, t in list(zip(rows, references, outputs["base"], outputs["tuned"]))[: cfg.samples_to_write]
    ))
    delta = {k: round(results["tuned"][k] - results["base"][k], 4)
             for k in results["base"] if isinstance(results["base"][k], (int, float))
             and isinstance(results["tuned"][k], (int, float))}
    return {"samples": len(rows), "max_new_tokens": cfg.max_new_tokens, **results, "delta": delta}
