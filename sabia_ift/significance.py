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


def _resample(n: int, statistic, resamples: int, seed: int):
    """`statistic` of `resamples` paired resamples of n items (rows of item indices drawn with
    replacement), drawn in chunks that bound the index matrix at about 16 MB."""
    import numpy as np

    rng = np.random.default_rng(seed)
    values = np.empty(resamples)
    chunk = max(1, 2_000_000 // n)
    for start in range(0, resamples, chunk):
        count = min(chunk, resamples - start)
        values[start:start + count] = statistic(rng.integers(0, n, size=(count, n)))
    return values


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
    means = _resample(diff.size, lambda index: diff[index].mean(axis=1), resamples, seed)
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
            if isinstance(old.get(key), str) or isinstance(new.get(key), str):
                continue  # labels such as the generation engine: recorded in the metrics, not compared
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


# --- benchmark tasks: base vs tuned on the same items --------------------------------------------

SIGNIFICANCE_LEVEL = 0.05


def mcnemar_exact(before, after) -> tuple[int, int, float]:
    """(items only `before` got right, items only `after` got right, two-sided exact McNemar p-value).

    Items both got right or both got wrong carry no information about the change; under no
    change each discordant item is a fair coin, so the p-value is a binomial test on them
    (what statsmodels' mcnemar(exact=True) computes).
    """
    from scipy.stats import binomtest

    if len(before) != len(after):
        raise ValueError(f"paired results differ in length: {len(before)} and {len(after)}")
    lost = sum(1 for b, a in zip(before, after, strict=True) if b and not a)
    won = sum(1 for b, a in zip(before, after, strict=True) if a and not b)
    p_value = 1.0 if lost + won == 0 else float(binomtest(won, lost + won, 0.5).pvalue)
    return lost, won, p_value


def _f1_macro_rows(pairs, index):
    """Macro F1 (tasks/utils.py's: over the gold classes present; an unreadable answer is wrong for
    every class) of each row of `index`, a (resamples, items) matrix of item positions."""
    import numpy as np

    golds = [g for g, _ in pairs]
    classes = sorted(set(golds))
    gold = np.array([classes.index(g) for g in golds])
    pred = np.array([classes.index(p) if p in classes else -1 for _, p in pairs])
    total = np.zeros(index.shape[0])
    present = np.zeros(index.shape[0])
    for c in range(len(classes)):
        tp = ((gold == c) & (pred == c))[index].sum(axis=1)
        fp = ((gold != c) & (pred == c))[index].sum(axis=1)
        fn = ((gold == c) & (pred != c))[index].sum(axis=1)
        in_sample = (gold == c)[index].any(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.where(tp > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
        total += np.where(in_sample, f1, 0.0)
        present += in_sample
    return total / present


def _pearson_rows(pairs, index):
    """Pearson correlation of each resample (NaN where either side is constant)."""
    import numpy as np

    x = np.array([g for g, _ in pairs], dtype=float)[index]
    y = np.array([p for _, p in pairs], dtype=float)[index]
    x = x - x.mean(axis=1, keepdims=True)
    y = y - y.mean(axis=1, keepdims=True)
    sxx, syy = (x * x).sum(axis=1), (y * y).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (x * y).sum(axis=1) / np.sqrt(sxx * syy)
    return np.where((sxx > 1e-12) & (syy > 1e-12), r, np.nan)


# The corpus-level statistics a benchmark's items feed, by metric name, vectorised over resamples.
CORPUS_STATISTICS = {"f1_macro": _f1_macro_rows, "pearson": _pearson_rows}


def paired_bootstrap_statistic(metric: str, before, after, resamples: int = 2000, confidence: float = 0.95,
                               seed: int = 0) -> tuple[Interval, float, int]:
    """(interval of after - before, bootstrap p-value, resamples where either side is undefined) for a
    corpus-level metric (CORPUS_STATISTICS) of paired items: each resample draws whole items, with
    the gold answer and both models' answers, and computes the metric on each side.

    The p-value is the percentile bootstrap's: twice the smaller share of resampled differences on
    either side of 0 (capped at 1), so it is below 1 - confidence exactly when the interval excludes 0.
    Resamples where the metric is undefined (Pearson of a constant side) are left out and counted.
    """
    import numpy as np

    if len(before) != len(after) or len(before) < 2:
        raise ValueError(f"a paired bootstrap needs two or more paired items, got {len(before)} and {len(after)}")
    statistic = CORPUS_STATISTICS[metric]
    n = len(before)
    diffs = _resample(n, lambda index: statistic(after, index) - statistic(before, index), resamples, seed)
    everything = np.arange(n)[None, :]
    change = float(statistic(after, everything)[0] - statistic(before, everything)[0])
    finite = diffs[np.isfinite(diffs)]
    undefined = int(resamples - finite.size)
    if finite.size == 0:
        return Interval(change, math.nan, math.nan, n), math.nan, undefined
    tail = (1 - confidence) / 2
    low, high = np.quantile(finite, [tail, 1 - tail])
    p_value = min(1.0, 2 * min(float((finite <= 0).mean()), float((finite >= 0).mean())))
    return Interval(change, float(low), float(high), n), p_value, undefined


def benchmark_test(metric: str, base_items: list, tuned_items: list, resamples: int = 2000,
                   seed: int = 0) -> dict[str, Any]:
    """The paired test of a task's tuned - base delta, as metrics/benchmarks.json records it.

    acc: exact McNemar on the items one model got right and the other wrong, with a paired
    bootstrap 95% interval of the accuracy difference; f1_macro and pearson: a paired bootstrap
    (interval and p-value). `significant`: p below 0.05; null where no test applies.
    """
    none = {"test": None, "ci95": None, "p_value": None, "significant": None}
    if len(base_items) < 2:
        return none
    if metric == "acc":
        lost, won, p_value = mcnemar_exact(base_items, tuned_items)
        interval = paired_bootstrap(base_items, tuned_items, resamples=resamples, seed=seed)
        return {"test": "mcnemar_exact", "ci95": [round(interval.low, 4), round(interval.high, 4)],
                "p_value": round(p_value, 4), "significant": p_value < SIGNIFICANCE_LEVEL,
                "discordant": {"base_only": lost, "tuned_only": won}}
    if metric in CORPUS_STATISTICS:
        interval, p_value, undefined = paired_bootstrap_statistic(metric, base_items, tuned_items,
                                                                  resamples=resamples, seed=seed)
        if not math.isfinite(p_value):
            return {**none, "undefined_resamples": undefined}
        return {"test": "paired_bootstrap", "ci95": [round(interval.low, 4), round(interval.high, 4)],
                "p_value": round(p_value, 4), "significant": interval.significant,
                "undefined_resamples": undefined}
    return none
