"""Tokenize stage: token ids and loss labels for `<s>` + prompt + response + `</s>`.

Labels are -100 on BOS and the prompt, the token ids on the response and on
the final EOS. They are built here from positions, never from pad ids, so the
real EOS is always trained (the earlier attempt lost it by masking pad == eos).
No padding is added: the collator pads each batch to its own longest row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..config import TokenizeConfig
from ..errors import ConfigError
from ..artifacts import HF_SPLITS, split_file
from ..io import atomic_path, read_jsonl
from ..progress import Progress
from ..template import IGNORE_INDEX

def encode_pairs(tokenizer, prompts: list[str], responses: list[str]) -> tuple[list[list[int]], list[list[int]], int]:
    """Prompt ids and response ids for each pair, and how many pairs needed the fallback.

    The response ids are the tail of the tokenized prompt+response, so they are
    what the tokenizer produces for the text as a whole. If the tokenizer merges
    across the prompt/response boundary (it should not: the template ends in a
    newline), the prompt is kept as inference sees it and the response is
    tokenized alone; such rows are counted.
    """
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer([p + r for p, r in zip(prompts, responses)], add_special_tokens=False)["input_ids"]
    response_ids, fallback = [], 0
    for p, f, response in zip(prompt_ids, full_ids, responses):
        if f[: len(p)] == p:
            response_ids.append(f[len(p):])
        else:
            fallback += 1
            response_ids.append(tokenizer(response, add_special_tokens=False)["input_ids"])
    return prompt_ids, response_ids, fallback


def build_example(prompt: list[int], response: list[int], bos: int, eos: int, max_length: int,
                  overlength: str) -> tuple[dict[str, list[int]] | None, str]:
    """One training example, or None with the reason it was left out."""
    input_ids = [bos, *prompt, *response, eos]
    if len(input_ids) <= max_length:
        labels = [IGNORE_INDEX] * (1 + len(prompt)) + [*response, eos]
        return {"input_ids": input_ids, "labels": labels}, "ok"
    room = max_length - 1 - len(prompt)
    if room < 1:
        return None, "prompt_too_long"
    if overlength == "drop":
        return None, "too_long"
    # Truncated responses end without EOS: teaching a stop mid-sentence would
    # be worse than not teaching a stop on this row.
    kept = response[:room]
    return {"input_ids": [bos, *prompt, *kept], "labels": [IGNORE_INDEX] * (1 + len(prompt)) + kept}, "truncated"


def length_stats(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {"mean": 0.0, "p50": 0.0, "p95": 0.0, "max": 0}
    arr = np.asarray(lengths)
    return {
        "mean": round(float(arr.mean()), 2),
        "p50": round(float(np.percentile(arr, 50)), 1),
        "p95": round(float(np.percentile(arr, 95)), 1),
        "max": int(arr.max()),
    }


def tokenize_split(tokenizer, rows: list[dict[str, Any]], cfg: TokenizeConfig, batch: int = 1024,
                   label: str = "tokenize"):
    """Examples and counters for one split; progress goes to stderr under `label`."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    examples: dict[str, list] = {"input_ids": [], "labels": [], "length": []}
    counts = {"rows_in": len(rows), "rows": 0, "truncated": 0, "dropped_too_long": 0,
              "dropped_prompt_too_long": 0, "boundary_fallback": 0, "tokens": 0, "trained_tokens": 0}
    progress = Progress(len(rows), label, unit="row")
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        prompts, responses, fallback = encode_pairs(
            tokenizer, [r["prompt"] for r in chunk], [r["response"] for r in chunk]
        )
        counts["boundary_fallback"] += fallback
        for p, r in zip(prompts, responses):
            example, status = build_example(p, r, bos, eos, cfg.max_length, cfg.overlength)
            if example is None:
                counts[f"dropped_{status}"] += 1
                continue
            counts["truncated"] += status == "truncated"
            examples["input_ids"].append(example["input_ids"])
            examples["labels"].append(example["labels"])
            examples["length"].append(len(example["input_ids"]))
            counts["rows"] += 1
            counts["tokens"] += len(example["input_ids"])
            counts["trained_tokens"] += sum(1 for t in example["labels"] if t != IGNORE_INDEX)
        progress(len(chunk))
    progress.close()
    counts["length"] = length_stats(examples["length"])
    return examples, counts


def tokenize(cfg: TokenizeConfig, tokenizer, context_length: int | None, formatted_dir: str | Path,
             out_dir: str | Path) -> dict[str, Any]:
    """Run the tokenize stage: an Arrow DatasetDict on disk and the stage metrics."""
    import datasets

    if context_length is not None and cfg.max_length > context_length:
        raise ConfigError(
            f"tokenize.max_length: {cfg.max_length} is above the base model's context of {context_length} tokens"
        )
    features = datasets.Features({
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "labels": datasets.Sequence(datasets.Value("int32")),
        "length": datasets.Value("int32"),
    })
    splits, metrics = {}, {}
    for split in HF_SPLITS:
        rows = read_jsonl(split_file(formatted_dir, split))
        examples, counts = tokenize_split(tokenizer, rows, cfg, label=f"tokenize {split}")
        splits[HF_SPLITS[split]] = datasets.Dataset.from_dict(examples, features=features)
        metrics[split] = counts
    with atomic_path(out_dir, is_dir=True) as tmp:
        datasets.DatasetDict(splits).save_to_disk(str(tmp))
    # No timings here: metrics/tokenize.json must be identical on every rerun.
    return {"max_length": cfg.max_length, "overlength": cfg.overlength, **metrics}
