"""Tokenize stage: token ids and loss labels for `<s>` + prompt + response + `</s>`.

Labels are -100 on BOS and the prompt, the token ids on the response and on
the final EOS. They are built here from positions, never from pad ids, so the
real EOS is always trained (the earlier attempt lost it by masking pad == eos).
No padding is added: the collator pads each batch to its own longest row.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..config import TokenizeConfig
from ..errors import ConfigError
from ..artifacts import HF_SPLITS, split_file
from ..io import atomic_path, read_jsonl
from ..progress import Progress
from ..template import IGNORE_INDEX, encode_text

log = logging.getLogger(__name__)

def encode_pairs(tokenizer, prompts: list[str], responses: list[str]) -> tuple[list[list[int]], list[list[int]], int]:
    """Prompt ids and response ids for each pair, and how many pairs needed the fallback.

    The response ids are the tail of the tokenized prompt+response, so they are
    what the tokenizer produces for the text as a whole. If the tokenizer merges
    across the prompt/response boundary (it should not: the template ends in a
    newline), the prompt is kept as inference sees it and the response is
    tokenized alone; such rows are counted.
    """
    prompt_ids = encode_text(tokenizer, prompts)
    full_ids = encode_text(tokenizer, [p + r for p, r in zip(prompts, responses)])
    response_ids, fallback = [], 0
    for p, f, response in zip(prompt_ids, full_ids, responses):
        if f[: len(p)] == p:
            response_ids.append(f[len(p):])
        else:
            fallback += 1
            response_ids.append(encode_text(tokenizer, response))
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
                   needed: list[int] | None = None, label: str = "tokenize"):
    """Examples and counters for one split; progress goes to stderr under `label`.

    Each example keeps its row's `source_row` and `prompt_length` (BOS + prompt),
    so evaluation asks exactly the prompts that survived here. `needed`, when
    given, receives each row's shortest max_length that would keep it.
    """
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    examples: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "source_row": [],
                                 "prompt_length": []}
    counts: dict[str, Any] = {"rows_in": len(rows), "rows": 0, "truncated": 0, "dropped_too_long": 0,
              "dropped_prompt_too_long": 0, "boundary_fallback": 0, "tokens": 0, "trained_tokens": 0}
    progress = Progress(len(rows), label, unit="row")
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        prompts, responses, fallback = encode_pairs(
            tokenizer, [r["prompt"] for r in chunk], [r["response"] for r in chunk]
        )
        counts["boundary_fallback"] += fallback
        for i, (row, p, r) in enumerate(zip(chunk, prompts, responses)):
            if needed is not None:
                # Kept whole: BOS + prompt + response + EOS; truncated: at least one response token.
                needed.append(len(p) + len(r) + 2 if cfg.overlength == "drop" else len(p) + 2)
            example, status = build_example(p, r, bos, eos, cfg.max_length, cfg.overlength)
            if example is None:
                counts[f"dropped_{status}"] += 1
                continue
            counts["truncated"] += status == "truncated"
            examples["input_ids"].append(example["input_ids"])
            examples["labels"].append(example["labels"])
            examples["length"].append(len(example["input_ids"]))
            # Rows made by hand (tests, scripts) may lack one: their place in the split stands in.
            examples["source_row"].append(row.get("source_row", start + i + 1))
            examples["prompt_length"].append(1 + len(p))
            counts["rows"] += 1
            counts["tokens"] += len(example["input_ids"])
            counts["trained_tokens"] += sum(1 for t in example["labels"] if t != IGNORE_INDEX)
        progress(len(chunk))
    progress.close()
    counts["dropped"] = counts["dropped_too_long"] + counts["dropped_prompt_too_long"]
    counts["drop_share"] = round(counts["dropped"] / len(rows), 4) if rows else 0.0
    counts["length"] = length_stats(examples["length"])
    return examples, counts


def check_drop_share(cfg: TokenizeConfig, metrics: dict[str, dict[str, Any]], needed: list[int],
                     context_length: int | None) -> None:
    """Refuse to lose more than tokenize.max_drop_share of the rows to max_length, silently or not."""
    rows_in = sum(m["rows_in"] for m in metrics.values())
    dropped = sum(m["dropped"] for m in metrics.values())
    if not rows_in or dropped / rows_in <= cfg.max_drop_share:
        return
    keep95 = int(math.ceil(np.percentile(np.asarray(needed), 95, method="higher")))
    per_split = ", ".join(f"{split} {m['dropped']} of {m['rows_in']}" for split, m in metrics.items())
    advice = f"a tokenize.max_length of {keep95} would keep 95% of rows"
    if context_length is not None and keep95 > context_length:
        advice += f", but the base model's context is {context_length} tokens"
    other = "tokenize.overlength: truncate, or " if cfg.overlength == "drop" else ""
    raise ConfigError(
        f"tokenize.max_drop_share: {dropped} of {rows_in} rows ({dropped / rows_in:.1%}) do not fit "
        f"tokenize.max_length {cfg.max_length} and would be dropped ({per_split}), above the allowed "
        f"{cfg.max_drop_share:.1%}; {advice}. Or set {other}a higher tokenize.max_drop_share"
    )


def summary(metrics: dict[str, Any]) -> str:
    """What the stage prints: rows kept and dropped per split."""
    parts = []
    for split in HF_SPLITS:
        m = metrics[split]
        part = f"{split} {m['rows']} of {m['rows_in']} rows"
        if m["dropped"]:
            part += f" ({m['dropped']} dropped, {m['drop_share']:.1%}, too long for max_length {metrics['max_length']})"
        if m["truncated"]:
            part += f" ({m['truncated']} truncated)"
        parts.append(part)
    return "tokenized: " + "; ".join(parts)


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
        "source_row": datasets.Value("int64"),
        "prompt_length": datasets.Value("int32"),
    })
    splits: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    needed: list[int] = []
    for split in HF_SPLITS:
        rows = read_jsonl(split_file(formatted_dir, split))
        examples, counts = tokenize_split(tokenizer, rows, cfg, needed=needed, label=f"tokenize {split}")
        metrics[split] = counts
        if counts["rows"]:
            splits[HF_SPLITS[split]] = datasets.Dataset.from_dict(examples, features=features)
    check_drop_share(cfg, metrics, needed, context_length)
    if not metrics["train"]["rows"]:
        raise ConfigError(f"{split_file(formatted_dir, 'train')}: no training row fits tokenize.max_length "
                          f"{cfg.max_length} ({metrics['train']['rows_in']} rows in the train split)")
    for split, split_name in (("val", "validation"), ("test", "test")):
        if not metrics[split]["rows"]:
            log.warning("the %s split is empty after tokenize (%d rows in): %s", split_name,
                        metrics[split]["rows_in"],
                        "training runs without evaluation" if split == "val" else "evaluate skips generation")
    with atomic_path(out_dir, is_dir=True) as tmp:
        # Empty splits are left out: the pinned datasets writes no file for one,
        # and load_from_disk would then fail. Readers treat a missing split as empty.
        datasets.DatasetDict(splits).save_to_disk(str(tmp))
    # No timings here: metrics/tokenize.json must be identical on every rerun.
    return {"max_length": cfg.max_length, "overlength": cfg.overlength, **metrics}
