"""The benchmark table of `sabia-ift report`: base vs tuned per task, each delta tested, overlaps shown.

`benchmark_rows(old, new, contamination)` takes two metrics/benchmarks.json contents (`old`
from the base revision, or None when it has none) and metrics/contamination.json's content
(or None) and returns table rows under BENCHMARK_HEADERS. Scores are the tasks' main metrics
as lm-eval reports them (0 to 1; Pearson -1 to 1); "constant answer" is the majority
baseline, what always giving the most frequent answer scores on the same rows. A delta
with a paired test (significance.benchmark_test: exact McNemar for accuracy, paired
bootstrap for F1 and Pearson) shows its 95% interval and p-value, and gets the verdict the
generation metrics get: better or worse only when the test says so. "overlap": training
rows that share an n-gram with the task's items (the contamination check), "—" where it
did not run.
"""

from __future__ import annotations

from typing import Any

BENCHMARK_HEADERS = ["task", "metric", "base", "tuned", "tuned − base [95% interval]", "p", "constant answer",
                     "tuned before", "examples", "shots", "overlap", "verdict"]
# Differences smaller than this are rounding, not a change (scores are written to 4 decimals).
TOLERANCE = 1e-4


def _num(value: Any) -> str:
    return "—" if value is None else f"{value:.4f}"


def _signed(value: Any) -> str:
    return "—" if value is None else f"{value:+.4f}"


def _delta(task: dict) -> str:
    interval = task.get("ci95")
    if task.get("delta") is None or not interval:
        return _signed(task.get("delta"))
    return f"{_signed(task['delta'])} [{_signed(interval[0])}, {_signed(interval[1])}]"


def _p(task: dict) -> str:
    p = task.get("p_value")
    return "—" if p is None else ("<0.0001" if p < 1e-4 else f"{p:.4f}")


def _overlap(name: str, contamination: dict | None) -> str:
    target = ((contamination or {}).get("targets") or {}).get(name)
    if not isinstance(target, dict) or target.get("rows_flagged") is None:
        return "—"
    flagged = target["rows_flagged"]
    return f"⚠️ {flagged} rows" if flagged else "0"


def _verdict(task: dict, before: dict | None) -> str:
    notes = []
    delta = task.get("delta")
    if task.get("significant") is not None and delta is not None:
        # Tested: the same marks as the generation metrics (every benchmark metric is higher-is-better).
        if not task["significant"]:
            notes.append("no significant change from base")
        else:
            notes.append("✅ better than base" if delta > 0 else "❌ worse than base")
    elif delta is not None and delta < -TOLERANCE:
        notes.append("❌ tuned below base (not tested)")
    if before and before.get("tuned") is not None and task.get("tuned") is not None:
        change = task["tuned"] - before["tuned"]
        if change < -TOLERANCE:
            notes.append("❌ tuned below the previous run (not tested)")
        elif change > TOLERANCE:
            notes.append("✅ tuned above the previous run (not tested)")
    if not notes and task.get("significant") is None and delta is not None and delta > TOLERANCE:
        notes.append("✅ tuned above base (not tested)")
    return "; ".join(notes)


def benchmark_rows(old: dict | None, new: dict, contamination: dict | None = None) -> list[list[str]]:
    """One row per task of `new` (tasks only in `old` are listed as removed), in `new`'s order."""
    old = old or {}
    rows = []
    for name, task in new.items():
        before = old.get(name)
        rows.append([
            name, str(task.get("metric", "")), _num(task.get("base")), _num(task.get("tuned")),
            _delta(task), _p(task), _num(task.get("majority_baseline")),
            _num(before.get("tuned")) if before else "—",
            str(task.get("n", "")), str(task.get("num_fewshot", "")), _overlap(name, contamination),
            _verdict(task, before),
        ])
    for name, task in old.items():
        if name not in new:
            rows.append([name, str(task.get("metric", "")), "—", "—", "—", "—", "—", _num(task.get("tuned")), "—",
                         "—", "—", "removed"])
    return rows
