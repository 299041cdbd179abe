"""Evaluate stage: the base model and the tuned one, side by side, on the same prompts.

One base model is loaded; the tuned model is the same weights with the LoRA
adapter switched on, so both are measured with identical loading, precision
and decoding. Metrics per model: EOS-stop rate, repetition, ROUGE-L, chrF,
exact match, mean new tokens, and loss/perplexity on the validation split.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any

from ..artifacts import HF_SPLITS, load_tokenized, prompt_sha1, split_file
from ..config import EvaluateConfig
from ..errors import DataError
from ..io import read_jsonl, write_jsonl
from ..modeling import load_tuned, pick_device
from ..progress import Progress
from ..template import IGNORE_INDEX
from ..text import normalize_text
from .generation import Generation, generate
from .metrics import load_metric

log = logging.getLogger(__name__)

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


def score(generations: list[Generation], references: list[str], ngram: int) -> tuple[dict[str, float], list[dict]]:
    """The model's metrics over all prompts, and each prompt's scores (artifacts.PROMPT_SCORES)."""
    predictions = [g.text for g in generations]
    rouge = load_metric("rouge_l").compute(predictions=predictions, references=references, per_prediction=True)
    chrf = load_metric("chrf").compute(predictions=predictions, references=references, per_prediction=True)
    repetition = load_metric("repetition").compute(predictions=predictions, n=ngram, per_prediction=True)
    per_prompt = [
        {"eos_stop": int(g.stopped), "rougeL": round(r, 4), "chrf": round(c, 4),
         "exact_match": int(normalize_text(g.text) == normalize_text(ref)),
         "repetition": round(rep, 4), "new_tokens": g.new_tokens}
        for g, ref, r, c, rep in zip(generations, references, rouge["rougeL_per_prediction"],
                                     chrf["chrf_per_prediction"], repetition["repetition_per_prediction"],
                                     strict=True)
    ]
    n = len(generations)
    summary = {
        "eos_stop_rate": round(sum(p["eos_stop"] for p in per_prompt) / n, 4),
        "repetition": round(repetition["repetition"], 4),
        "rougeL": round(rouge["rougeL"], 4),
        "chrf": round(chrf["chrf"], 4),
        "exact_match": round(sum(p["exact_match"] for p in per_prompt) / n, 4),
        "mean_new_tokens": round(sum(p["new_tokens"] for p in per_prompt) / n, 2),
    }
    return summary, per_prompt


def test_prompts(formatted_dir: str | Path, test_split, max_samples: int | None
                 ) -> tuple[list[dict[str, Any]], list[list[int]]]:
    """The test rows that survived tokenize, in its order, with their prompt ids.

    Prompts come from the tokenized examples (BOS + prompt, as trained), so a
    row tokenize dropped (too long for the model) is never generated for; the
    reference text comes from the formatted row with the same source_row.
    """
    if test_split is None:
        return [], []
    if "source_row" not in test_split.column_names or "prompt_length" not in test_split.column_names:
        raise DataError("data/tokenized: the test split has no source_row/prompt_length columns "
                        "(written by an older version); rerun the tokenize stage")
    path = split_file(formatted_dir, "test")
    by_source = {row["source_row"]: row for row in read_jsonl(path)}
    n = len(test_split) if max_samples is None else min(max_samples, len(test_split))
    head = test_split.select(range(n))
    rows, prompts = [], []
    for source_row, ids, prompt_length in zip(head["source_row"], head["input_ids"], head["prompt_length"]):
        if source_row not in by_source:
            raise DataError(f"{path}: no row with source_row {source_row}, which data/tokenized holds; "
                            "rerun the tokenize stage")
        rows.append(by_source[source_row])
        prompts.append(list(ids[:prompt_length]))
    return rows, prompts


def evaluate(cfg: EvaluateConfig, base_dir: str | Path, adapter_dir: str | Path, formatted_dir: str | Path,
             tokenized_dir: str | Path, samples_path: str | Path, prompts_path: str | Path) -> dict[str, Any]:
    """Run the evaluate stage; returns metrics/eval.json's content and writes the samples file and
    each prompt's scores (prompts_path), which let the report test a change for significance.

    An empty test split (format.test_size: 0, or tokenize dropped every test
    row) skips generation; an empty validation split leaves val_loss null.
    """
    import torch
    from transformers import set_seed

    set_seed(0)
    device = pick_device(cfg.device, "evaluate.device")
    tokenizer, model = load_tuned(base_dir, adapter_dir, device)
    data = load_tokenized(tokenized_dir)
    rows, prompts = test_prompts(formatted_dir, data.get(HF_SPLITS["test"]), cfg.max_samples)
    validation = data.get(HF_SPLITS["val"])
    info: dict[str, Any] = {"samples": len(rows), "max_new_tokens": cfg.max_new_tokens}
    if not rows:
        info["skipped"] = "the test split is empty (format.test_size: 0, or tokenize dropped every test row)"
        log.warning("%s: no generation metrics", info["skipped"])
    references = [row["response"] for row in rows]
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None:
        # Prompt + answer must fit the model's context; longer prompts get a shorter budget.
        capped = sum(1 for p in prompts if len(p) + cfg.max_new_tokens > context)
        info.update(context_length=context, capped_by_context=capped)
        if capped:
            log.warning("%d test prompts leave fewer than evaluate.max_new_tokens (%d) tokens of the model's "
                        "%d-token context; their answers are capped to fit", capped, cfg.max_new_tokens, context)

    results: dict[str, dict[str, Any]] = {}
    outputs: dict[str, list] = {}
    per_prompt: dict[str, list] = {}
    for name in ("base", "tuned"):
        # The base model is the same weights with the adapter switched off.
        switch = model.disable_adapter() if name == "base" else contextlib.nullcontext()
        with switch, torch.inference_mode():
            with Progress(len(prompts), f"evaluate {name}", unit="prompt") as progress:
                gens = generate(model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
                                batch_size=cfg.batch_size, device=device, context_length=context,
                                progress=progress) if rows else []
            loss = token_loss(model, tokenizer, validation, cfg.batch_size, device) if validation else math.nan
        outputs[name] = gens
        summary, per_prompt[name] = score(gens, references, cfg.repetition_ngram) if rows else ({}, [])
        results[name] = {**summary,
                         "val_loss": round(loss, 6) if math.isfinite(loss) else None,
                         "val_perplexity": round(math.exp(loss), 4) if math.isfinite(loss) else None}

    write_jsonl(samples_path, (
        {"source_row": row["source_row"], "prompt": row["prompt"], "reference": ref,
         "base": b.text, "base_stopped": b.stopped, "tuned": t.text, "tuned_stopped": t.stopped}
        for row, ref, b, t in list(zip(rows, references, outputs["base"], outputs["tuned"]))[: cfg.samples_to_write]
    ))
    write_jsonl(prompts_path, (
        {"source_row": row["source_row"], "prompt_sha1": prompt_sha1(row["prompt"], ref), "base": b, "tuned": t}
        for row, ref, b, t in zip(rows, references, per_prompt["base"], per_prompt["tuned"], strict=True)
    ))
    base, tuned = results["base"], results["tuned"]
    delta = {k: round(tuned[k] - base[k], 4) for k, v in base.items()
             if isinstance(v, (int, float)) and isinstance(tuned.get(k), (int, float))}
    return {**info, **results, "delta": delta}
