"""The paired bootstrap and each metric's verdict, on synthetic per-prompt scores."""

from __future__ import annotations

import pytest

from sabia_ift.artifacts import PROMPT_SCORES
from sabia_ift.significance import DIFFERENT_BASE, Interval, Row, compare, paired_bootstrap


def scores_at(values: dict[str, list[float]], base: dict[str, list[float]] | None = None, sha=str) -> dict:
    """eval_prompts records for source rows 1..n; unnamed scores are 0."""
    n = len(next(iter(values.values())))
    def model(v, i):
        return {s: v.get(s, [0] * n)[i] for s in PROMPT_SCORES}
    return {i + 1: {"source_row": i + 1, "prompt_sha1": sha(i + 1), "tuned": model(values, i),
                    "base": model(base or {}, i)} for i in range(n)}


def eval_at(prompts: dict) -> dict:
    """metrics/eval.json as evaluate writes it for these records (chrf as a plain mean here)."""
    def means(model):
        return {agg: sum(r[model][s] for r in prompts.values()) / len(prompts) for s, agg in PROMPT_SCORES.items()}
    tuned, base = means("tuned"), means("base")
    return {"samples": len(prompts), "max_new_tokens": 16, "base": {**base, "val_loss": 2.0},
            "tuned": {**tuned, "val_loss": 1.5}, "delta": {k: tuned[k] - base[k] for k in tuned}}


def test_bootstrap_large_effect_is_significant():
    import numpy as np

    rng = np.random.default_rng(1)
    before = rng.uniform(0.2, 0.6, 200)
    after = before + 0.1 + rng.normal(0, 0.05, 200)
    t = paired_bootstrap(before, after, resamples=2000, seed=0)
    assert t.significant and 0.08 < t.low < t.change < t.high < 0.12
    # The width a normal approximation gives: 2 x 1.96 standard errors of the mean difference.
    diff = after - before
    assert t.high - t.low == pytest.approx(2 * 1.96 * diff.std() / np.sqrt(diff.size), rel=0.15)
    assert t.prompts == 200
    # Seeded: the same interval every time.
    assert paired_bootstrap(before, after, resamples=2000, seed=0) == t


def test_bootstrap_identical_and_one_prompt_in_a_hundred_are_not_significant():
    same_scores = [0.3, 0.5, 0.9, 0.1] * 25
    t = paired_bootstrap(same_scores, same_scores)
    assert (t.change, t.low, t.high, t.significant) == (0, 0, 0, False)

    before, after = [0] * 100, [0] * 99 + [1]  # exact_match +0.01: one more prompt answered exactly
    t = paired_bootstrap(before, after)
    assert t.change == pytest.approx(0.01) and t.low == 0 and not t.significant


def test_bootstrap_refuses_fewer_than_two_pairs():
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [0.0])


def test_prompts_pair_by_identity_not_position():
    before = scores_at({"rougeL": [0.1, 0.2, 0.3, 0.4]})
    after = {row: before[row] | {"tuned": before[row]["tuned"] | {"rougeL": before[row]["tuned"]["rougeL"] + 0.1}}
             for row in reversed(before)}  # another order, each prompt 0.1 better
    after[5] = {**after[4], "source_row": 5}  # a prompt main never scored
    after[3] = {**after[3], "prompt_sha1": "other prompt"}  # same row number, different prompt
    cmp = compare(eval_at(before), eval_at(after), before, after, "main", "this PR")
    row = next(r for r in cmp.tuned if r.metric == "rougeL")
    assert cmp.shared == 3 and row.test.prompts == 3
    assert row.test.change == pytest.approx(0.1) and row.verdict == "better"


def test_verdicts_follow_each_metrics_direction():
    up, down = Interval(0.1, 0.05, 0.15, 100), Interval(-0.1, -0.15, -0.05, 100)
    assert Row("rougeL", 0.2, 0.3, up).verdict == "better"
    assert Row("repetition", 0.2, 0.3, up).verdict == "worse"  # lower is better
    assert Row("repetition", 0.3, 0.2, down).verdict == "better"
    assert Row("mean_new_tokens", 20, 30, up).verdict == "changed"  # no better direction
    assert Row("rougeL", 0.2, 0.21, Interval(0.01, -0.01, 0.03, 100)).verdict == "no significant change"
    assert Row("val_loss", 2.0, 1.5, None).verdict == ""  # not tested
    assert Row("rougeL", 0.2, 0.3, up, held=DIFFERENT_BASE).verdict == DIFFERENT_BASE


def test_identical_scores_are_unchanged_not_just_insignificant():
    same = scores_at({"rougeL": [0.1, 0.4, 0.7, 0.2]})
    cmp = compare(eval_at(same), eval_at(same), same, same, "main", "this PR")
    assert all(r.unchanged for r in cmp.tuned if r.test is not None)
    noisy = compare(eval_at(same), eval_at(same), same, scores_at({"rougeL": [0.1, 0.4, 0.7, 0.3]}), "main", "PR")
    assert not next(r for r in noisy.tuned if r.metric == "rougeL").unchanged


def test_a_different_base_keeps_the_intervals_and_holds_the_tuned_verdicts():
    n = 50
    before = scores_at({"rougeL": [0.2] * n}, base={"rougeL": [0.1] * n})
    rising = [0.001 * i for i in range(n)]
    after = scores_at({"rougeL": [0.5 + x for x in rising]}, base={"rougeL": [0.3 + x for x in rising]})
    cmp = compare(eval_at(before), eval_at(after), before, after, "main", "this PR", same_base=False)
    rouge = next(r for r in cmp.tuned if r.metric == "rougeL")
    assert rouge.test is not None and rouge.test.significant and rouge.verdict == DIFFERENT_BASE
    assert cmp.different_base and cmp.base is not None
    # The base model's own change is a plain comparison of two base models: it keeps its verdict.
    assert next(r for r in cmp.base if r.metric == "rougeL").verdict == "better"

    # A base whose files changed (say, its weights copied into the cache) but whose every score is
    # the same tuned nothing differently as far as the test prompts can tell: verdicts stand.
    same_base = scores_at({"rougeL": [0.5 + x for x in rising]}, base={"rougeL": [0.1] * n})
    cmp = compare(eval_at(before), eval_at(same_base), before, same_base, "main", "this PR", same_base=False)
    assert not cmp.different_base and cmp.base is None
    assert next(r for r in cmp.tuned if r.metric == "rougeL").verdict == "better"


def test_a_reason_from_the_caller_skips_every_test():
    before, after = scores_at({"rougeL": [0.2] * 10}), scores_at({"rougeL": [0.5] * 10})
    cmp = compare(eval_at(before), eval_at(after), before, after, "main", "this PR", untested="not comparable")
    assert cmp.untested == "not comparable"
    assert all(r.test is None and r.verdict == "" for r in cmp.tuned)
    row = next(r for r in cmp.tuned if r.metric == "rougeL")
    assert row.plain_diff == pytest.approx(0.3)
