"""Evaluate stage: the base model and the tuned one, side by side, on the same prompts.

One base model is loaded; the tuned model is the same weights with the LoRA
adapter switched on, so both are measured with identical loading, precision
and decoding. Metrics per model: EOS-stop rate, repetition, ROUGE-L, chrF,
exact match, mean new tokens, and loss/perplexity on the validation split.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from ..artifacts import HF_SPLITS, check_loading, load_tokenized, prompt_sha1, split_file
from ..config import EvaluateConfig
from ..errors import DataError
from ..io import atomic_path, read_jsonl, write_json, write_jsonl
from ..modeling import load_base, load_tuned, pick_device
from ..progress import Progress
from ..template import IGNORE_INDEX
from ..text import normalize_text
from .generation import Generation, generate_with
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


# What evaluate_base writes into its folder, and evaluate reads back.
BASE_SUMMARY = "summary.json"
BASE_PROMPTS = "prompts.jsonl"
def _setup(cfg: EvaluateConfig, model, tokenized_dir: str | Path, formatted_dir: str | Path):
    data = load_tokenized(tokenized_dir)
    rows, prompts = test_prompts(formatted_dir, data.get(HF_SPLITS["test"]), cfg.max_samples)
    info: dict[str, Any] = {"samples": len(rows), "max_new_tokens": cfg.max_new_tokens}
    if not rows:
        info["skipped"] = "the test split is empty (format.test_size: 0, or tokenize dropped every test row)"
        log.warning("%s: no generation metrics", info["skipped"])
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None:
        # Prompt + answer must fit the model's context; longer prompts get a shorter budget.
        capped = sum(1 for p in prompts if len(p) + cfg.max_new_tokens > context)
        info.update(context_length=context, capped_by_context=capped)
        if capped:
            log.warning("%d test prompts leave fewer than evaluate.max_new_tokens (%d) tokens of the model's "
                        "%d-token context; their answers are capped to fit", capped, cfg.max_new_tokens, context)
    return rows, prompts, data.get(HF_SPLITS["val"]), info


def _measure(cfg: EvaluateConfig, name: str, model, tokenizer, device: str, rows: list[dict],
             prompts: list[list[int]], validation, context: int | None) -> tuple[dict, list[Generation], list[dict]]:
    """One model's metrics, generations and per-prompt scores."""
    import torch

    references = [row["response"] for row in rows]
    with torch.inference_mode():
        with Progress(len(prompts), f"evaluate {name}", unit="prompt") as progress:
            gens, engine = generate_with(cfg.engine, model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
                                         batch_size=cfg.batch_size, device=device, context_length=context,
                                         progress=progress) if rows else ([], None)
        start = time.perf_counter()
        loss = token_loss(model, tokenizer, validation, cfg.batch_size, device) if validation else math.nan
        if validation:
            log.info("%s: validation loss over %d rows in %.1f s", name, len(validation), time.perf_counter() - start)
    start = time.perf_counter()
    summary, per_prompt = score(gens, references, cfg.repetition_ngram) if rows else ({}, [])
    if rows:
        log.info("%s: %d answers scored in %.1f s", name, len(rows), time.perf_counter() - start)
    return ({**summary, "val_loss": round(loss, 6) if math.isfinite(loss) else None,
             "val_perplexity": round(math.exp(loss), 4) if math.isfinite(loss) else None,
             **({"engine": engine} if engine else {})}, gens, per_prompt)


def evaluate_base(cfg: EvaluateConfig, loading: dict[str, Any], base_dir: str | Path, formatted_dir: str | Path,
                  tokenized_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """The base model's half of the evaluate stage, written to `out_dir` (summary.json: its metrics;
    prompts.jsonl: each test prompt's generation and scores). Needs no adapter: an experiment
    that changes only the training reads these instead of generating them again."""
    from transformers import set_seed

    set_seed(0)
    device = pick_device(cfg.device, "evaluate.device")
    tokenizer, model = load_base(base_dir, device, **loading)
    model.eval()
    rows, prompts, validation, info = _setup(cfg, model, tokenized_dir, formatted_dir)
    metrics, gens, per_prompt = _measure(cfg, "base", model, tokenizer, device, rows, prompts, validation,
                                         info.get("context_length"))
    summary = {**info, "loading": loading, "base": metrics}
    with atomic_path(out_dir, is_dir=True) as tmp:
        write_json(tmp / BASE_SUMMARY, summary)
        write_jsonl(tmp / BASE_PROMPTS, (
            {"source_row": row["source_row"], "prompt_sha1": prompt_sha1(row["prompt"], row["response"]),
             "text": g.text, "stopped": g.stopped, "scores": p}
            for row, g, p in zip(rows, gens, per_prompt, strict=True)))
    return summary


def read_base(base_results: str | Path, rows: list[dict], info: dict[str, Any]) -> tuple[dict, list[dict]]:
    """evaluate_base's summary and per-prompt records, checked to be for these very prompts, in order."""
    folder = Path(base_results)
    summary_path, prompts_path = folder / BASE_SUMMARY, folder / BASE_PROMPTS
    if not summary_path.is_file() or not prompts_path.is_file():
        raise DataError(f"{folder}: no base results; run the evaluate_base stage first (dvc repro evaluate_base)")
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    records = read_jsonl(prompts_path)
    expected = [(row["source_row"], prompt_sha1(row["prompt"], row["response"])) for row in rows]
    found = [(r.get("source_row"), r.get("prompt_sha1")) for r in records]
    for key in ("samples", "max_new_tokens"):
        if summary.get(key) != info.get(key):
            raise DataError(f"{summary_path}: {key} is {summary.get(key)}, this evaluation's is {info.get(key)}; "
                            "rerun the evaluate_base stage")
    if found != expected:
        first = next(i for i in range(max(len(found), len(expected)))
                     if i >= min(len(found), len(expected)) or found[i] != expected[i])
        raise DataError(f"{prompts_path}: row {first + 1} is not the test prompt this evaluation scores "
                        "(the data changed since it was written); rerun the evaluate_base stage")
    return summary, records


def evaluate(cfg: EvaluateConfig, base_dir: str | Path, adapter_dir: str | Path, formatted_dir: str | Path,
             tokenized_dir: str | Path, base_results: str | Path, samples_path: str | Path,
             prompts_path: str | Path) -> dict[str, Any]:
    """Run the evaluate stage: the tuned model measured here, the base read from evaluate_base's
    folder (`base_results`), paired prompt by prompt. Returns metrics/eval.json's content and writes
    the samples file and each prompt's scores (prompts_path), which let the report test a change
    for significance.

    An empty test split (format.test_size: 0, or tokenize dropped every test
    row) skips generation; an empty validation split leaves val_loss null.
    """
    from transformers import set_seed

    set_seed(0)
    device = pick_device(cfg.device, "evaluate.device")
    tokenizer, model = load_tuned(base_dir, adapter_dir, device)
    rows, prompts, validation, info = _setup(cfg, model, tokenized_dir, formatted_dir)
    base_summary, base_records = read_base(base_results, rows, info)
    check_loading(adapter_dir, base_summary.get("loading") or {}, str(Path(base_results) / BASE_SUMMARY))
    tuned, gens, per_prompt = _measure(cfg, "tuned", model, tokenizer, device, rows, prompts, validation,
                                       info.get("context_length"))
    base = base_summary["base"]
    references = [row["response"] for row in rows]
    write_jsonl(samples_path, (
        {"source_row": row["source_row"], "prompt": row["prompt"], "reference": ref,
         "base": b["text"], "base_stopped": b["stopped"], "tuned": t.text, "tuned_stopped": t.stopped}
        for row, ref, b, t in list(zip(rows, references, base_records, gens))[: cfg.samples_to_write]
    ))
    write_jsonl(prompts_path, (
        {"source_row": row["source_row"], "prompt_sha1": b["prompt_sha1"], "base": b["scores"], "tuned": t}
        for row, b, t in zip(rows, base_records, per_prompt, strict=True)
    ))
    delta = {k: round(tuned[k] - base[k], 4) for k, v in base.items()
             if isinstance(v, (int, float)) and isinstance(tuned.get(k), (int, float))}
    return {**info, "base": base, "tuned": tuned, "delta": delta}
