"""Format stage: clean rows, apply the template, split train/val/test.

Every row that does not reach a split is counted by reason in
metrics/format.json; nothing disappears without a number. Rows stream: the
stage holds one row at a time, a 16-byte digest per kept row to find
duplicates, and a byte per kept row for its split.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..artifacts import DROPPED, RAW_ROWS, SPLITS, split_file
from ..config import FormatConfig
from ..errors import ConfigError, DataError
from ..io import atomic_path, dumps, iter_jsonl
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


def _identity(instruction: str, input_: str, output: str) -> bytes:
    """What makes two rows duplicates, as a digest: a million rows' identities take
    megabytes, not their text. The first two fields carry their length, so no text
    moved from one field to the next makes two different rows alike."""
    key = f"{len(instruction)}:{instruction}{len(input_)}:{input_}{output}"
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def clean_row(row: dict[str, Any], seen: dict[bytes, int]) -> tuple[bool, dict[str, Any]]:
    """(True, the row kept, with its prompt) or (False, the drop, with its reason).

    Text is normalised first (text.normalize_text), so a row of invisible
    characters is empty and a trailing zero-width space does not hide a duplicate.
    `seen` maps the identity of each row kept so far to its source_row.
    """
    instruction = normalize_text(row["instruction"])
    input_ = normalize_text(row["input"])
    output = normalize_text(row["output"])
    reason = "empty_instruction" if not instruction else "empty_output" if not output else None
    if reason:
        return False, {"source_row": row["source_row"], "reason": reason}
    key = _identity(instruction, input_, output)
    if key in seen:
        return False, {"source_row": row["source_row"], "reason": "duplicate", "duplicate_of": seen[key]}
    seen[key] = row["source_row"]
    return True, {
        "prompt": build_prompt(instruction, input_),
        "response": output,
        "instruction": instruction,
        "input": input_,
        "source_row": row["source_row"],
    }


def clean_rows(rows: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows kept (with their prompt) and rows dropped (with the reason), in order."""
    seen: dict[bytes, int] = {}
    kept: list[dict[str, Any]] = []
    dropped: list[dict[str, Any]] = []
    for row in rows:
        ok, out = clean_row(row, seen)
        (kept if ok else dropped).append(out)
    return kept, dropped


def _assign_splits(n: int, val_n: int, test_n: int, seed: int) -> bytearray:
    """Each kept row's split (an index into SPLITS), from the seeded shuffle of all n rows."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    split_of = bytearray(n)  # 0: train
    for i in order[:test_n]:
        split_of[i] = SPLITS.index("test")
    for i in order[test_n:test_n + val_n]:
        split_of[i] = SPLITS.index("val")
    return split_of


def format_rows(cfg: FormatConfig, raw_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Run the format stage; returns the counts written to metrics/format.json.

    Two passes: the first cleans each row and writes the kept ones aside, the
    second deals them into their splits once their number (and so the split sizes) is known.
    """
    raw = Path(raw_dir) / RAW_ROWS
    seen: dict[bytes, int] = {}
    counts: Counter[str] = Counter()
    rows_in = invisible = with_input = kept = 0
    with atomic_path(out_dir, is_dir=True) as tmp:
        aside = tmp / ".kept.jsonl"
        with aside.open("w", encoding="utf-8", newline="\n") as kept_fh, \
                (tmp / DROPPED).open("w", encoding="utf-8", newline="\n") as dropped_fh:
            for row in iter_jsonl(raw):
                rows_in += 1
                invisible += any(has_invisible(row[f]) for f in ("instruction", "input", "output"))
                ok, out = clean_row(row, seen)
                if not ok:
                    counts[f"dropped_{out['reason']}"] += 1
                    dropped_fh.write(dumps(out) + "\n")
                    continue
                kept += 1
                with_input += bool(out["input"])
                kept_fh.write(dumps(out) + "\n")
        del seen
        if not kept:
            reasons = ", ".join(f"{n} {k.removeprefix('dropped_')}" for k, n in sorted(counts.items()))
            raise DataError(f"{raw}: no usable rows left after cleaning ({reasons})")
        val_n, test_n = split_sizes(kept, cfg.val_size, cfg.test_size)
        for key, n in (("val_size", val_n), ("test_size", test_n)):
            if n == 0:
                log.warning("format.%s is 0: no %s split (%s)", key, key.removesuffix("_size"),
                            "training runs without evaluation" if key == "val_size" else "evaluate skips generation")
        split_of = _assign_splits(kept, val_n, test_n, cfg.seed)
        # Each split keeps source order so the files read naturally.
        outs = [split_file(tmp, split).open("wb") for split in SPLITS]
        try:
            with aside.open("rb") as lines:
                for i, line in enumerate(lines):
                    outs[split_of[i]].write(line)
        finally:
            for fh in outs:
                fh.close()
        aside.unlink()
    sizes = Counter(split_of)
    return {
        "rows_in": rows_in,
        "dropped_empty_instruction": counts["dropped_empty_instruction"],
        "dropped_empty_output": counts["dropped_empty_output"],
        "dropped_duplicate": counts["dropped_duplicate"],
        # Rows whose text lost invisible or control characters (zero-width spaces, NUL, ESC, ...).
        "cleaned_invisible_chars": invisible,
        "rows_out": kept,
        "with_input_share": round(with_input / kept, 4),
        **{f"{split}_rows": sizes[SPLITS.index(split)] for split in SPLITS},
    }
