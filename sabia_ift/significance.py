"""Whether a change moved the tuned model: a paired bootstrap over test prompts, and each metric's verdict.

Both revisions' per-prompt scores (metrics/eval_prompts.jsonl) are paired by
prompt; a change counts as better or worse only when the interval of the mean
per-prompt difference excludes 0: on 100 prompts, one more exact match is
noise, not progress. Pure numbers in, rows with verdicts out: reading the
revisions and writing the report are `report.py`'s job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .artifacts import PROMPT_SCORES
from .evaluation.metrics import HIGHER_IS_BETTER

MODELS = ("tuned", "base")
# metrics/eval.json keys per model, in the order a reviewer reads them.
EVAL_KEYS = ["eos_stop_rate", "rougeL", "chrf", "exact_match", "repetition", "mean_new_tokens",
             "val_loss", "val_perplexity"]
# Per-prompt score behind each eval.json key that has one.
SCORE_OF = {aggregate: score for score, aggregate in PROMPT_SCORES.items()}
# The verdict of a tuned-model row compared across two different base models.
DIFFERENT_BASE = "different base"


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Interval:
    """Mean per-prompt change (after - before) and its bootstrap percentile interval."""

    change: float
    low: float
    high: float
    prompts: int

    @property
    def significant(self) -> bool:
        return self.low > 0 or self.high < 0


def paired_bootstrap(before, after, resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> Interval:
    """Percentile interval of the mean paired difference, resampling prompts with replacement.

    Paired: a resample draws whole prompts, each with its score at both revisions,
    so the variation between prompts (some are just hard) cancels out.
    """
    import numpy as np

    diff = np.asarray(after, dtype=float) - np.asarray(before, dtype=float)
    if diff.ndim != 1 or diff.size < 2:
        raise ValueError(f"a paired bootstrap needs two or more paired scores, got {diff.size}")
    if not 0 < confidence < 1 or resamples < 1:
        raise ValueError(f"confidence must be in (0, 1) and resamples positive, got {confidence}, {resamples}")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 2_000_000 // diff.size)  # bounds the index matrix at about 16 MB
    for start in range(0, resamples, chunk):
        count = min(chunk, resamples - start)
        means[start:start + count] = diff[rng.integers(0, diff.size, size=(count, diff.size))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Interval(float(diff.mean()), float(low), float(high), int(diff.size))


@dataclass(frozen=True)
class Row:
    """One metric of one model, before and after the change."""

    metric: str
    before: Any
    after: Any
    test: Interval | None
    held: str = ""  # why a tested row gets no better/worse verdict (DIFFERENT_BASE), if it does not

    @property
    def verdict(self) -> str:
        """better, worse, 'no significant change', 'changed' (no known direction), the reason a verdict
        is held, or '' (not tested)."""
        if self.test is None:
            return ""
        if self.held:
            return self.held
        if not self.test.significant:
            return "no significant change"
        direction = HIGHER_IS_BETTER.get(self.metric)
        if direction is None:
            return "changed"
        return "better" if (self.test.change > 0) == direction else "worse"

    @property
    def unchanged(self) -> bool:
        """Tested, and the same score on every prompt at both revisions."""
        return self.test is not None and self.test.change == self.test.low == self.test.high == 0

    @property
    def plain_diff(self) -> float | None:
        if is_number(self.before) and is_number(self.after):
            return self.after - self.before
        return None


@dataclass(frozen=True)
class Comparison:
    tuned: list[Row]
    base: list[Row] | None  # None: the base model's scores are the same at both revisions
    base_reference: dict  # the base model's metrics at the head, the charts' reference line
    shared: int  # prompts both revisions scored
    prompts: tuple[int, int]  # prompts evaluated at each revision
    untested: str | None  # why there is no significance test, if there is none

    @property
    def different_base(self) -> bool:
        """The tuned rows' verdicts are held: they were tuned from base models that scored differently."""
        return any(row.held == DIFFERENT_BASE for row in self.tuned)


def compare(before_eval: dict, after_eval: dict, before_prompts: dict[int, dict] | None,
            after_prompts: dict[int, dict] | None, before_label: str, after_label: str,
            resamples: int = 2000, confidence: float = 0.95, seed: int = 0, *,
            untested: str | None = None, same_base: bool = True) -> Comparison:
    """Each metric of both models at two revisions, tested where per-prompt scores allow.

    `untested`: a reason, found by the caller, not to test at all (the revisions were built
    from different inputs). `same_base=False`: the revisions' base models differ on purpose;
    the tuned rows keep their intervals but their verdict is DIFFERENT_BASE, unless the
    base model's scores turn out the same at both revisions.
    """
    missing = [label for label, p in ((before_label, before_prompts), (after_label, after_prompts)) if p is None]
    shared: list[int] = []
    if before_prompts is not None and after_prompts is not None:
        # Pairs by prompt identity: the same source row holding the same prompt and reference.
        shared = sorted(row for row in before_prompts.keys() & after_prompts.keys()
                        if before_prompts[row].get("prompt_sha1") == after_prompts[row].get("prompt_sha1"))
    if untested is None and missing:
        untested = f"no per-prompt scores at {' and '.join(missing)}: no significance test"
    elif untested is None and len(shared) < 2:
        untested = (f"{len(shared)} test prompts in common between {before_label} and {after_label}: "
                    "no significance test")
    base_same = (before_eval.get("base") == after_eval.get("base")
                 and before_eval.get("samples") == after_eval.get("samples"))
    held = DIFFERENT_BASE if not same_base and not base_same else ""

    def rows(model: str, held: str = "") -> list[Row]:
        old, new = before_eval.get(model) or {}, after_eval.get(model) or {}
        keys = [k for k in EVAL_KEYS if k in old or k in new] + sorted((old.keys() | new.keys()) - set(EVAL_KEYS))
        out = []
        for key in keys:
            test = None
            if untested is None and key in SCORE_OF and before_prompts is not None and after_prompts is not None:
                score = SCORE_OF[key]
                test = paired_bootstrap([before_prompts[r][model][score] for r in shared],
                                        [after_prompts[r][model][score] for r in shared],
                                        resamples=resamples, confidence=confidence, seed=seed)
            out.append(Row(key, old.get(key), new.get(key), test, held if test is not None else ""))
        return out

    return Comparison(tuned=rows("tuned", held), base=None if base_same else rows("base"),
                      base_reference=after_eval.get("base") or {}, shared=len(shared),
                      prompts=(_count(before_eval, before_prompts), _count(after_eval, after_prompts)),
                      untested=untested)


def _count(evaluation: dict, prompts: dict | None) -> int:
    return len(prompts) if prompts is not None else int(evaluation.get("samples") or 0)
