"""Which rows a benchmark task shows as few-shot examples and which it scores.

Data files are often sorted (by label, by exam, by source), so their first
rows are no sample: a label-sorted file cut at `limit` scores one class only,
and a constant answer then looks perfect. So, per task:

* the few-shot examples are the leaderboard's listed ones where the data
  holds them, else a seeded draw from the few-shot pool (or from the rows,
  held out of what is scored);
* a row whose prompt repeats a few-shot example, or an earlier row, is
  removed and counted (text compared as text.comparable reads it);
* `limit` draws a seeded sample of the rest, stratified by the gold answer
  where there is one (proportional allocation, largest remainders), so the
  scored classes keep the file's shares;
* the majority baseline, the score of always giving the most frequent gold
  answer under the task's own metric, is computed on the scored rows.

Rows are in the shapes sabia_ift/evaluation/tasks/utils.py documents.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..text import comparable
from .tasks.utils import f1_macro, mean

log = logging.getLogger(__name__)

# What a row's prompt shows: two rows with the same (comparable) fields ask the same thing.
PROMPT_FIELDS = {"enem": ("question", "choices"), "multiple_choice": ("question", "choices"),
                 "classification": ("text",), "tweetsentbr": ("text",),
                 "assin2_rte": ("premise", "hypothesis"), "assin2_sts": ("premise", "hypothesis"),
                 "faquad_nli": ("question", "answer")}
# The field of a discrete gold answer (a letter or a label); assin2_sts has a score instead.
GOLD_FIELD = {"enem": "answer", "multiple_choice": "answer", "classification": "label",
              "tweetsentbr": "label", "assin2_rte": "label", "faquad_nli": "label"}
# A constant answer scoring above this on the scored rows earns most of a score without reading
# a single item: the stage warns (macro F1 of two or more classes stays below 0.5; one class gives 1.0).
CONSTANT_ANSWER_WARNING = 0.5


@dataclass
class Selection:
    test: list[dict[str, Any]]
    fewshot: list[dict[str, Any]]
    available: int                   # rows that could be scored: after few-shot and duplicates, before limit
    duplicates_removed: int          # rows whose prompt repeats an earlier row's
    fewshot_duplicates_removed: int  # rows whose prompt repeats a few-shot example's


def prompt_key(row: dict[str, Any], kind: str) -> tuple:
    return tuple(tuple(comparable(str(v)) for v in value) if isinstance(value := row[field], list)
                 else comparable(str(value)) for field in PROMPT_FIELDS[kind])


def proportional_quotas(sizes: dict[Any, int], k: int) -> dict[Any, int]:
    """How many of `k` draws each class gets: its floor share of k, the seats left over going to the
    largest remainders (ties: the larger class, then the label's text). Integer arithmetic only."""
    total = sum(sizes.values())
    quotas = {c: k * n // total for c, n in sizes.items()}
    order = sorted(sizes, key=lambda c: (-(k * sizes[c] % total), -sizes[c], str(c)))
    for c in order[: k - sum(quotas.values())]:
        quotas[c] += 1
    return quotas


def sample(rows: Sequence[dict[str, Any]], k: int | None, seed: int | str,
           gold_field: str | None) -> list[dict[str, Any]]:
    """`k` rows drawn with `seed` (all of them when k is None or not smaller), stratified by
    `gold_field` when given; in the rows' own order."""
    if k is None or k >= len(rows):
        return list(rows)
    rng = random.Random(seed)
    if gold_field is None:
        picked = rng.sample(range(len(rows)), k)
    else:
        classes: dict[Any, list[int]] = {}
        for i, row in enumerate(rows):
            classes.setdefault(row[gold_field], []).append(i)
        quotas = proportional_quotas({c: len(members) for c, members in classes.items()}, k)
        picked = [i for c in sorted(classes, key=str) for i in rng.sample(classes[c], quotas[c])]
    return [rows[i] for i in sorted(picked)]


def select(kind: str, rows: Sequence[dict[str, Any]], pool: Sequence[dict[str, Any]] | None, *,
           num_fewshot: int, limit: int | None, seed: int,
           listed: Sequence[dict[str, Any]] = ()) -> Selection:
    """Few-shot examples and scored rows of one task.

    `pool` None holds the few-shot examples out of `rows`. `listed` are the
    leaderboard's own examples, in order, found in the pool (empty when the
    data lacks them); they are used when they cover `num_fewshot`. The caller
    checks that the pool holds `num_fewshot` rows.
    """
    source = rows if pool is None else pool
    if len(listed) >= num_fewshot:
        fewshot = list(listed[:num_fewshot])
    else:
        fewshot = random.Random(f"{seed}/fewshot").sample(list(source), num_fewshot)
    shown = {prompt_key(row, kind) for row in fewshot}
    taken = {id(row) for row in fewshot}
    seen: set[tuple] = set()
    kept, duplicates, of_fewshot = [], 0, 0
    for row in rows:
        if id(row) in taken:
            continue
        key = prompt_key(row, kind)
        if key in shown:
            of_fewshot += 1
        elif key in seen:
            duplicates += 1
        else:
            seen.add(key)
            kept.append(row)
    test = sample(kept, limit, f"{seed}/scored", GOLD_FIELD.get(kind))
    return Selection(test, fewshot, len(kept), duplicates, of_fewshot)


def majority_baseline(kind: str, rows: Sequence[dict[str, Any]], metric: str) -> float | None:
    """The score of always answering the most frequent gold answer of `rows`, under `metric`
    (acc or f1_macro, as the task YAMLs aggregate them); None for a task without one (a score)."""
    field = GOLD_FIELD.get(kind)
    if field is None or not rows:
        return None
    golds = [row[field] for row in rows]
    constant = Counter(golds).most_common(1)[0][0]
    if metric == "f1_macro":
        return round(f1_macro([(gold, constant) for gold in golds]), 4)
    return round(mean([float(gold == constant) for gold in golds]), 4)


def warn_if_constant_wins(name: str, kind: str, rows: Sequence[dict[str, Any]], baseline: float | None) -> None:
    field = GOLD_FIELD.get(kind)
    if field is None or not rows:
        return
    counts = Counter(row[field] for row in rows)
    if len(counts) == 1:
        log.warning("benchmark task %s: every scored item has the answer %r; its score measures nothing",
                    name, next(iter(counts)))
    elif baseline is not None and baseline > CONSTANT_ANSWER_WARNING:
        gold, n = counts.most_common(1)[0]
        log.warning("benchmark task %s: always answering %r scores %.4f (%d of %d items); compare "
                    "scores with majority_baseline", name, gold, baseline, n, len(rows))
