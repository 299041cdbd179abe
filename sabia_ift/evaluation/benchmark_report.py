"""The benchmark table of `sabia-ift report`: base vs tuned per task, regressions marked.

`benchmark_rows(old, new)` takes two metrics/benchmarks.json contents (`old`
from the base revision, or None when it has none) and returns table rows
under BENCHMARK_HEADERS. Scores are the tasks' main metrics as lm-eval
reports them (0 to 1; Pearson -1 to 1); "constant answer" is the majority
baseline, what always giving the most frequent answer scores on the same rows.
"""

from __future__ import annotations

from typing import Any

BENCHMARK_HEADERS = ["task", "metric", "base", "tuned", "tuned − base", "constant answer", "tuned before",
                     "examples", "shots", "verdict"]
# Differences smaller than this are rounding, not a change (scores are written to 4 decimals).
TOLERANCE = 1e-4


def _num(value: Any) -> str:
    return "—" if value is None else f"{value:.4f}"


def _signed(value: Any) -> str:
    return "—" if value is None else f"{value:+.4f}"


def _verdict(task: dict, before: dict | None) -> str:
    notes = []
    delta = task.get("delta")
    if delta is not None and delta < -TOLERANCE:
        notes.append("❌ tuned below base")
    if before and before.get("tuned") is not None and task.get("tuned") is not None:
        change = task["tuned"] - before["tuned"]
        if change < -TOLERANCE:
            notes.append("❌ tuned below the previous run")
        elif change > TOLERANCE:
            notes.append("✅ tuned above the previous run")
    if not notes and delta is not None and delta > TOLERANCE:
        notes.append("✅ tuned above base")
    return "; ".join(notes)


def benchmark_rows(old: dict | None, new: dict) -> list[list[str]]:
    """One row per task of `new` (tasks only in `old` are listed as removed), in `new`'s order."""
    old = old or {}
    rows = []
    for name, task in new.items():
        before = old.get(name)
        rows.append([
            name, str(task.get("metric", "")), _num(task.get("base")), _num(task.get("tuned")),
            _signed(task.get("delta")), _num(task.get("majority_baseline")),
            _num(before.get("tuned")) if before else "—",
            str(task.get("n", "")), str(task.get("num_fewshot", "")), _verdict(task, before),
        ])
    for name, task in old.items():
        if name not in new:
            rows.append([name, str(task.get("metric", "")), "—", "—", "—", "—", _num(task.get("tuned")), "—", "—",
                         "removed"])
    return rows
