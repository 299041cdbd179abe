"""Contamination check: word n-gram overlap of training rows with the test split and every benchmark.

Text is compared as words of its `text.comparable` form (NFKC, case-folded, no
invisible characters) with punctuation dropped, so case, punctuation, spacing
and line breaks do not hide a copy. Every target item's n-grams become 64-bit
hashes in sorted numpy arrays; training rows then stream in chunks, their
n-gram hashes computed for the whole chunk at once (a rolling polynomial over
word hashes) and looked up with a binary search. Only a row with a hit is
looked at again, to name the items it shares text with and the longest shared run.

An item shorter than n words can hold no n-gram: one of at least
`min_item_words` words is matched on its whole word sequence instead; a shorter
one is not checked, and counted.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import CONTAMINATED, FLAGGED, split_file
from ..config import BenchmarkConfig, ContaminationConfig
from ..errors import ConfigError, DataError
from ..evaluation.benchmark_data import load_task_data
from ..io import atomic_path, dumps, iter_jsonl, write_json
from ..text import comparable

_WORD = re.compile(r"\w+")
# Odd 64-bit multiplier of the rolling hash; arithmetic wraps modulo 2**64.
_PRIME = np.uint64(0x9E3779B97F4A7C15)
# Keys of a benchmark row that hold no text a model is shown as the item (ids, gold answers).
_NOT_TEXT = frozenset({"id", "answer", "label", "labels", "group", "score"})
CHUNK_ROWS = 4096


def words(text: str) -> list[str]:
    """The words n-grams are made of: NFKC, case-folded, punctuation and whitespace dropped."""
    return _WORD.findall(comparable(text))


class _WordHashes:
    """Stable 64-bit word hashes (Python's own str hash changes with every process), cached."""

    def __init__(self, limit: int = 2_000_000) -> None:
        self.cache: dict[str, int] = {}
        self.limit = limit

    def __call__(self, tokens: list[str]) -> np.ndarray:
        cache = self.cache
        if len(cache) > self.limit:
            cache.clear()
        out = np.empty(len(tokens), dtype=np.uint64)
        for i, word in enumerate(tokens):
            value = cache.get(word)
            if value is None:
                value = int.from_bytes(hashlib.blake2b(word.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                                       "little")
                cache[word] = value
            out[i] = value
        return out


def gram_hashes(word_hashes: np.ndarray, k: int) -> np.ndarray:
    """Hash of every run of k consecutive words (len - k + 1 of them; none when shorter)."""
    count = len(word_hashes) - k + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    acc = word_hashes[:count].copy()
    for j in range(1, k):
        acc *= _PRIME
        acc += word_hashes[j:j + count]
    return acc


def item_text(row: dict[str, Any]) -> str:
    """What a benchmark row shows the model: every text field and choice, not its id or gold answer."""
    parts: list[str] = []
    for key, value in row.items():
        if key in _NOT_TEXT:
            continue
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, list):
            parts.extend(v for v in value if isinstance(v, str))
    return "\n".join(parts)


def row_text(row: dict[str, Any]) -> str:
    """A formatted row's own text (instruction, input and response; the template's words left out)."""
    return "\n".join(row.get(k) or "" for k in ("instruction", "input", "response"))


@dataclass
class Targets:
    """Every target item's n-gram hashes, by gram length, and which items hold each hash."""

    n: int
    names: list[str] = field(default_factory=list)
    items: dict[str, int] = field(default_factory=dict)
    too_short: dict[str, int] = field(default_factory=dict)
    item_ids: list[tuple[int, str]] = field(default_factory=list)       # (target index, item id)
    item_words: list[int] = field(default_factory=list)                 # words in each item's grams
    item_length: list[int] = field(default_factory=list)                # words in each item
    item_grams: list[np.ndarray] = field(default_factory=list)          # each item's gram hashes, in order
    owners: dict[int, dict[int, list[int]]] = field(default_factory=dict)  # k -> hash -> item numbers
    sorted_hashes: dict[int, np.ndarray] = field(default_factory=dict)


def build_targets(sets: dict[str, Iterable[tuple[str, str]]], cfg: ContaminationConfig,
                  hasher: _WordHashes | None = None) -> Targets:
    """Targets from {target name: (item id, item text), ...}."""
    hasher = hasher or _WordHashes()
    targets = Targets(cfg.n)
    owners: dict[int, defaultdict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    for t, (name, items) in enumerate(sets.items()):
        targets.names.append(name)
        targets.items[name] = targets.too_short[name] = 0
        for ident, text in items:
            targets.items[name] += 1
            tokens = words(text)
            if len(tokens) < cfg.min_item_words:
                targets.too_short[name] += 1
                continue
            k = min(cfg.n, len(tokens))
            number = len(targets.item_ids)
            targets.item_ids.append((t, ident))
            targets.item_words.append(k)
            targets.item_length.append(len(tokens))
            targets.item_grams.append(gram_hashes(hasher(tokens), k))
            for value in np.unique(targets.item_grams[-1]).tolist():
                owners[k][value].append(number)
    targets.owners = {k: dict(table) for k, table in owners.items()}
    targets.sorted_hashes = {k: np.array(sorted(table), dtype=np.uint64) for k, table in targets.owners.items()}
    return targets


def _hit_rows(chunk: list[np.ndarray], targets: Targets) -> set[int]:
    """Positions in `chunk` (word-hash arrays of rows) of rows holding any target gram."""
    lengths = np.array([len(a) for a in chunk], dtype=np.int64)
    if not lengths.sum():
        return set()
    flat = np.concatenate(chunk)
    ends = np.cumsum(lengths)
    row_of = np.repeat(np.arange(len(chunk)), lengths)
    hit: set[int] = set()
    for k, table in targets.sorted_hashes.items():
        grams = gram_hashes(flat, k)
        if not len(grams):
            continue
        # A gram must end inside the row it starts in.
        inside = np.arange(len(grams)) + k <= ends[row_of[: len(grams)]]
        where = np.searchsorted(table, grams)
        found = (where < len(table)) & (table[np.minimum(where, len(table) - 1)] == grams) & inside
        hit.update(np.unique(row_of[: len(grams)][found]).tolist())
    return hit


def _covered(positions: Iterable[int], k: int) -> int:
    """Words covered by grams of k words starting at ascending `positions`."""
    covered = end = 0
    for start in positions:
        covered += start + k - max(start, end)
        end = start + k
    return covered


def _pairs(word_hashes: np.ndarray, targets: Targets) -> dict[int, tuple[int, float]]:
    """{item number: (words of the longest run this row shares with it, share of the item's words
    inside grams the row holds)} for one row, of each item sharing a gram with it."""
    runs: dict[int, list[int]] = defaultdict(list)
    grams = {k: gram_hashes(word_hashes, k) for k in targets.owners}
    for k, table in targets.owners.items():
        for position, value in enumerate(grams[k].tolist()):
            for number in table.get(value, ()):
                runs[number].append(position)
    found: dict[int, tuple[int, float]] = {}
    for number, positions in runs.items():
        # A run of r consecutive grams of k words covers r + k - 1 words (k: n, or a short item's length).
        k = targets.item_words[number]
        longest = run = 1
        for before, after in zip(positions, positions[1:]):
            run = run + 1 if after == before + 1 else 1
            longest = max(longest, run)
        # Counted on the item's side: a row repeating one sentence of it twice holds no more of it.
        inside = np.flatnonzero(np.isin(targets.item_grams[number], grams[k])).tolist()
        found[number] = longest + k - 1, _covered(inside, k) / targets.item_length[number]
    return found


def scan(rows: Iterable[tuple[int, str]], targets: Targets, hasher: _WordHashes | None = None,
         chunk_rows: int = CHUNK_ROWS) -> Iterator[tuple[int, dict[int, tuple[int, float]]]]:
    """(row id, {item number: (overlap words, share of the item)}) for each row sharing text with a target."""
    hasher = hasher or _WordHashes()

    def flush(ids: list[int], chunk: list[np.ndarray]) -> Iterator[tuple[int, dict[int, tuple[int, float]]]]:
        for position in sorted(_hit_rows(chunk, targets)):
            yield ids[position], _pairs(chunk[position], targets)

    ids: list[int] = []
    chunk: list[np.ndarray] = []
    for ident, text in rows:
        ids.append(ident)
        chunk.append(hasher(words(text)))
        if len(chunk) >= chunk_rows:
            yield from flush(ids, chunk)
            ids, chunk = [], []
    if chunk:
        yield from flush(ids, chunk)


def check(rows: Iterable[tuple[int, str]], targets: Targets, cfg: ContaminationConfig,
          hasher: _WordHashes | None = None) -> tuple[dict[str, Any], list[dict[str, Any]], list[int]]:
    """(metrics, flagged pairs, flagged row ids) of training rows (row id, text) against `targets`."""
    checked = 0

    def counted() -> Iterator[tuple[int, str]]:
        nonlocal checked
        for row in rows:
            checked += 1
            yield row

    flagged_by: dict[str, set[int]] = {name: set() for name in targets.names}
    pairs: list[dict[str, Any]] = []
    flagged_rows: list[int] = []
    for ident, found in scan(counted(), targets, hasher):
        kept = {number: v for number, v in found.items() if v[1] >= cfg.min_item_share}
        if not kept:
            continue
        flagged_rows.append(ident)
        for number, (overlap, share) in sorted(kept.items()):
            t, item = targets.item_ids[number]
            flagged_by[targets.names[t]].add(ident)
            pairs.append({"train_row": ident, "target": targets.names[t], "item": item, "overlap_words": overlap,
                          "item_share": round(share, 4)})
    metrics: dict[str, Any] = {
        "n": cfg.n,
        "policy": cfg.policy,
        "rows_checked": checked,
        "rows_flagged": len(flagged_rows),
        "targets": {name: {"items": targets.items[name], "rows_flagged": len(flagged_by[name]),
                           "share": round(len(flagged_by[name]) / checked, 6) if checked else 0.0,
                           "items_too_short": targets.too_short[name]}
                    for name in targets.names},
        "longest": sorted(pairs, key=lambda p: (-p["overlap_words"], p["train_row"], p["target"], p["item"]))[
            : cfg.longest],
    }
    return metrics, pairs, flagged_rows


def benchmark_items(bench: BenchmarkConfig, root: str | Path) -> dict[str, list[tuple[str, str]]]:
    """Every benchmark task's items as the benchmark stage reads them: each row it could score (no limit)
    and the few-shot examples it shows (drawn with benchmark.seed)."""
    sets = {}
    for index, task in enumerate(bench.tasks):
        data = load_task_data(task, index, root=root, seed=bench.seed, limit=None)
        sets[task.name] = [(str(row["id"]), item_text(row)) for row in [*data.test, *data.fewshot]]
    return sets


def split_rows(formatted_dir: str | Path, split: str) -> Iterator[tuple[int, str]]:
    """(source_row, text) of each row of a formatted split, streamed."""
    for row in iter_jsonl(split_file(formatted_dir, split)):
        yield row["source_row"], row_text(row)


def run_stage(cfg: ContaminationConfig, bench: BenchmarkConfig, formatted_dir: str | Path, out_dir: str | Path,
              root: str | Path = ".") -> dict[str, Any]:
    """The contamination stage: flagged pairs and the rows to drop under `out_dir`; returns the metrics.

    Policy fail raises DataError with the counts before anything is written.
    """
    if any(task.name == "test" for task in bench.tasks):
        raise ConfigError("benchmark.tasks: a task named test would share its name with the test split; rename it")
    hasher = _WordHashes()
    sets: dict[str, Iterable[tuple[str, str]]] = {
        "test": [(str(ident), text) for ident, text in split_rows(formatted_dir, "test")],
        **benchmark_items(bench, root)}
    targets = build_targets(sets, cfg, hasher)
    metrics, pairs, flagged = check(split_rows(formatted_dir, "train"), targets, cfg, hasher)
    if cfg.policy == "fail" and flagged:
        counts = ", ".join(f"{name} {t['rows_flagged']}" for name, t in metrics["targets"].items() if t["rows_flagged"])
        raise DataError(f"{split_file(formatted_dir, 'train')}: {len(flagged)} of {metrics['rows_checked']} training "
                        f"rows share a {cfg.n}-word run with a test or benchmark item ({counts}); "
                        "contamination.policy is fail (drop removes them, report only lists them)")
    dropped = sorted(flagged) if cfg.policy == "drop" else []
    metrics["rows_dropped"] = len(dropped)
    with atomic_path(out_dir, is_dir=True) as tmp:
        with (tmp / FLAGGED).open("w", encoding="utf-8", newline="\n") as fh:
            for pair in pairs:
                fh.write(dumps(pair) + "\n")
        write_json(tmp / CONTAMINATED, {"policy": cfg.policy, "source_rows": dropped})
    return metrics
