"""Contamination check: word n-gram overlap of training rows with the test split and every benchmark.

Text is compared as words of its `text.comparable` form (NFKC, case-folded, no
invisible characters) with punctuation dropped, so case, punctuation, spacing
and line breaks do not hide a copy. Every target item's n-grams become 64-bit
hashes in sorted numpy arrays; training rows then stream in chunks, their
n-gram hashes computed for the whole chunk at once (a rolling polynomial over
word hashes) and looked up with a binary search. The items each hit belongs
to, the longest shared run and the share of the item covered are then worked
out for the whole chunk at once too (sorting the hits by row and item), so a
corpus whose every row shares some text with the test split costs no
per-row Python work beyond splitting its words.

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


class _WordHashes(dict[str, int]):
    """Stable 64-bit word hashes (Python's own str hash changes with every process), cached."""

    def __init__(self, limit: int = 2_000_000) -> None:
        super().__init__()
        self.limit = limit

    def __missing__(self, word: str) -> int:
        value = int.from_bytes(hashlib.blake2b(word.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
        self[word] = value
        return value

    def __call__(self, tokens: list[str]) -> np.ndarray:
        if len(self) > self.limit:
            self.clear()
        return np.fromiter(map(self.__getitem__, tokens), dtype=np.uint64, count=len(tokens))


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
class _Grams:
    """The target grams of one length k as sorted arrays: each distinct hash (`keys`), the items
    holding it (`owner_item[owner_start[i]:owner_start[i + 1]]` for keys[i]) and every place
    it stands in them (`entry_item`, `entry_pos` from entry_start[i] to entry_start[i + 1])."""

    keys: np.ndarray
    owner_start: np.ndarray
    owner_item: np.ndarray
    entry_start: np.ndarray
    entry_item: np.ndarray
    entry_pos: np.ndarray

    @classmethod
    def of(cls, hashes: np.ndarray, item: np.ndarray, pos: np.ndarray) -> _Grams:
        order = np.lexsort((pos, item, hashes))
        hashes, item, pos = hashes[order], item[order], pos[order]
        keys, first = np.unique(hashes, return_index=True)
        owner = np.ones(len(hashes), dtype=bool)
        owner[1:] = (hashes[1:] != hashes[:-1]) | (item[1:] != item[:-1])
        owner_start = np.append(np.searchsorted(hashes[owner], keys), owner.sum())
        return cls(keys, owner_start, item[owner], np.append(first, len(hashes)), item, pos)


@dataclass
class Targets:
    """Every target item's n-gram hashes, by gram length, and which items hold each hash where."""

    n: int
    names: list[str] = field(default_factory=list)
    items: dict[str, int] = field(default_factory=dict)
    too_short: dict[str, int] = field(default_factory=dict)
    item_ids: list[tuple[int, str]] = field(default_factory=list)       # (target index, item id)
    item_length: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))  # words in each item
    grams: dict[int, _Grams] = field(default_factory=dict)              # k -> the grams of k words


def build_targets(sets: dict[str, Iterable[tuple[str, str]]], cfg: ContaminationConfig,
                  hasher: _WordHashes | None = None) -> Targets:
    """Targets from {target name: (item id, item text), ...}."""
    hasher = hasher or _WordHashes()
    targets = Targets(cfg.n)
    lengths: list[int] = []
    parts: defaultdict[int, list[tuple[np.ndarray, int]]] = defaultdict(list)  # k -> (gram hashes, item number)
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
            parts[k].append((gram_hashes(hasher(tokens), k), len(targets.item_ids)))
            targets.item_ids.append((t, ident))
            lengths.append(len(tokens))
    targets.item_length = np.array(lengths, dtype=np.int64)
    for k, grams in parts.items():
        targets.grams[k] = _Grams.of(np.concatenate([g for g, _ in grams]),
                                     np.concatenate([np.full(len(g), i, dtype=np.int64) for g, i in grams]),
                                     np.concatenate([np.arange(len(g), dtype=np.int64) for g, _ in grams]))
    return targets


def _expand(start: np.ndarray, which: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every element of the ranges start[w]:start[w + 1] for w in `which`: (its w's place in `which`, its index)."""
    low = start[which]
    counts = start[which + 1] - low
    origin = np.repeat(np.arange(len(which)), counts)
    return origin, np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts) + low[origin]


def _firsts(sorted_keys: np.ndarray) -> np.ndarray:
    """Where each run of equal values in `sorted_keys` begins, as a mask."""
    first = np.ones(len(sorted_keys), dtype=bool)
    first[1:] = sorted_keys[1:] != sorted_keys[:-1]
    return first


def _chunk_pairs(flat: np.ndarray, lengths: np.ndarray, targets: Targets,
                 min_share: float) -> dict[int, dict[int, tuple[int, float]]]:
    """{row position: {item number: (longest shared run in words, share of the item's words inside grams
    the row holds)}} of the rows of a chunk (their word hashes end to end in `flat`), for each pair sharing
    a gram whose share is at least `min_share`. Every (row, item, gram) meeting is handled at once, in numpy."""
    found: defaultdict[int, dict[int, tuple[int, float]]] = defaultdict(dict)
    ends = np.cumsum(lengths)
    row_of = np.repeat(np.arange(len(lengths)), lengths)
    items = len(targets.item_length)
    for k, table in targets.grams.items():
        grams = gram_hashes(flat, k)
        if not len(grams) or not len(table.keys):
            continue
        rows = row_of[: len(grams)]
        where = np.minimum(np.searchsorted(table.keys, grams), len(table.keys) - 1)
        # A gram must end inside the row it starts in.
        at = np.flatnonzero((table.keys[where] == grams) & (np.arange(len(grams)) + k <= ends[rows]))
        if not len(at):
            continue
        key, hit_row = where[at], rows[at]

        # The row's side: its gram positions each item holds, ascending within a pair (a stable sort
        # of ascending positions), and the longest run of consecutive ones; r grams cover r + k - 1 words.
        origin, owner = _expand(table.owner_start, key)
        pair = hit_row[origin] * items + table.owner_item[owner]
        order = np.argsort(pair, kind="stable")
        pair, position = pair[order], at[origin][order]
        first = _firsts(pair)
        run = first.copy()
        run[1:] |= position[1:] != position[:-1] + 1
        runs = np.flatnonzero(run)
        longest = np.maximum.reduceat(np.diff(np.append(runs, len(pair))), np.flatnonzero(first[runs]))
        pairs = pair[first]

        # The item's side: its gram positions whose hash the row holds (a row repeating one sentence of
        # it twice holds no more of it), and the words grams starting there cover.
        distinct = np.unique(hit_row * len(table.keys) + key)
        origin, entry = _expand(table.entry_start, distinct % len(table.keys))
        pair = (distinct // len(table.keys))[origin] * items + table.entry_item[entry]
        start = table.entry_pos[entry]
        order = np.lexsort((start, pair))
        pair, start = pair[order], start[order]
        first = _firsts(pair)
        step = np.full(len(start), k, dtype=np.int64)
        step[1:] = np.where(first[1:], k, np.minimum(k, start[1:] - start[:-1]))
        share = np.add.reduceat(step, np.flatnonzero(first)) / targets.item_length[pairs % items]
        keep = share >= min_share
        for p, words_, s in zip(pairs[keep].tolist(), (longest[keep] + k - 1).tolist(), share[keep].tolist()):
            found[p // items][p % items] = words_, s
    return found


def scan(rows: Iterable[tuple[int, str]], targets: Targets, hasher: _WordHashes | None = None,
         chunk_rows: int = CHUNK_ROWS, min_share: float = 0.0,
         ) -> Iterator[tuple[int, dict[int, tuple[int, float]]]]:
    """(row id, {item number: (overlap words, share of the item)}) for each row sharing text with a target
    (pairs covering less than `min_share` of the item left out; a row left with none is not yielded)."""
    hasher = hasher or _WordHashes()

    def flush(ids: list[int], tokens: list[str], lengths: list[int],
              ) -> Iterator[tuple[int, dict[int, tuple[int, float]]]]:
        found = _chunk_pairs(hasher(tokens), np.array(lengths, dtype=np.int64), targets, min_share)
        for position in sorted(found):
            yield ids[position], found[position]

    ids: list[int] = []
    tokens: list[str] = []
    lengths: list[int] = []
    for ident, text in rows:
        row = words(text)
        ids.append(ident)
        tokens += row
        lengths.append(len(row))
        if len(ids) >= chunk_rows:
            yield from flush(ids, tokens, lengths)
            ids, tokens, lengths = [], [], []
    if ids:
        yield from flush(ids, tokens, lengths)


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
    for ident, found in scan(counted(), targets, hasher, min_share=cfg.min_item_share):
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
