"""Format stage: clean rows, apply the template, split train/val/test.

Every row that does not reach a split is counted by reason in
metrics/format.json; nothing disappears without a number.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from pathlib import Path
from typing import Any

from ..artifacts import DROPPED, RAW_ROWS, SPLITS, split_file
from ..config import FormatConfig
from ..errors import ConfigError, DataError
from ..io import atomic_path, read_jsonl, write_jsonl
from ..template import build_prompt
from ..text import has_invisible, normalize_text

log = logging.getLogger(__name__)


def split_sizes(n: int, val_size: int | float, test_size: int | float) -> tuple[int, int]:
    """Rows for validation and test. A share asks for a non-empty split: on small
    data, where it would round to 0 rows, it gets 1. Only 0 means none."""
    def count(size: int | float) -> int:
        return int(size) if isinstance(size, int) else max(1, round(size * n))

    val, test = count(val_size), count(test_size)
    if val + test >= n:
        alone = [f"format.{key} alone asks for {size}" for key, size in (("test_size", test), ("val_size", val))
                 if size >= n]
        raise ConfigError(
            f"format.val_size ({val}) + format.test_size ({test}) leave no training rows: "
            f"only {n} rows remain after cleaning" + (f" ({'; '.join(alone)})" if alone else "")
        )
    return val, test


def clean_rows(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows kept (with their prompt) and rows dropped (with the reason).

    Text is normalised first (text.normalize_text), so a row of invisible
    characters is empty and a trailing zero-width space does not hide a duplicate.
    """
    seen: dict[tuple[str, str, str], int] = {}
    kept, dropped = [], []
    for row in rows:
        instruction = normalize_text(row["instruction"])
        input_ = normalize_text(row["input"])
        output = normalize_text(row["output"])
        key = (instruction, input_, output)
        reason = None
        if not instruction:
            reason = "empty_instruction"
        elif not output:
            reason = "empty_output"
        elif key in seen:
            reason = "duplicate"
        if reason:
            entry = {"source_row": row["source_row"], "reason": reason}
            if reason == "duplicate":
                entry["duplicate_of"] = seen[key]
            dropped.append(entry)
            continue
        seen[key] = row["source_row"]
        kept.append({
            "prompt": build_prompt(instruction, input_),
            "response": output,
            "instruction": instruction,
            "input": input_,
            "source_row": row["source_row"],
        })
    return kept, dropped


def format_rows(cfg: FormatConfig, raw_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Run the format stage; returns the counts written to metrics/format.json."""
    rows = read_jsonl(Path(raw_dir) / RAW_ROWS)
    kept, dropped = clean_rows(rows)
    counts = Counter(f"dropped_{d['reason']}" for d in dropped)
    invisible = sum(1 for row in rows if any(has_invisible(row[f]) for f in ("instruction", "input", "output")))
    if not kept:
        reasons = ", ".join(f"{n} {k.removeprefix('dropped_')}" for k, n in sorted(counts.items()))
        raise DataError(f"{Path(raw_dir) / RAW_ROWS}: no usable rows left after cleaning ({reasons})")
    val_n, test_n = split_sizes(len(kept), cfg.val_size, cfg.test_size)
    for key, n in (("val_size", val_n), ("test_size", test_n)):
        if n == 0:
            log.warning("format.%s is 0: no %s split (%s)", key, key.removesuffix("_size"),
                        "training runs without evaluation" if key == "val_size" else "evaluate skips generation")
    order = list(range(len(kept)))
    random.Random(cfg.seed).shuffle(order)
    # Each split keeps source order so the files read naturally.
    picks = {
        "test": sorted(order[:test_n]),
        "val": sorted(order[test_n:test_n + val_n]),
        "train": sorted(order[test_n + val_n:]),
    }
    with atomic_path(out_dir, is_dir=True) as tmp:
        for split in SPLITS:
            write_jsonl(split_file(tmp, split), (kept[i] for i in picks[split]))
        write_jsonl(tmp / DROPPED, dropped)
    with_input = sum(1 for row in kept if row["input"])
    return {
        "rows_in": len(rows),
        "dropped_empty_instruction": counts["dropped_empty_instruction"],
        "dropped_empty_output": counts["dropped_empty_output"],
        "dropped_duplicate": counts["dropped_duplicate"],
        # Rows whose text lost invisible or control characters (zero-width spaces, NUL, ESC, ...).
        "cleaned_invisible_chars": invisible,
        "rows_out": len(kept),
        "with_input_share": round(with_input / len(kept), 4),
        **{f"{split}_rows": len(picks[split]) for split in SPLITS},
    }
