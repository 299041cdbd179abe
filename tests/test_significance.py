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


# --- benchmark deltas: paired tests on per-item results -------------------------------------------

def test_mcnemar_exact_is_scipys_binomial_test_on_the_discordant_items():
    import numpy as np
    from scipy.stats import binomtest

    from sabia_ift.significance import mcnemar_exact

    rng = np.random.default_rng(3)
    for n, p_base, p_tuned in ((40, 0.3, 0.5), (120, 0.5, 0.52), (15, 0.2, 0.9)):
        base = (rng.random(n) < p_base).astype(float)
        tuned = (rng.random(n) < p_tuned).astype(float)
        lost, won, p = mcnemar_exact(base.tolist(), tuned.tolist())
        assert lost == int(((base == 1) & (tuned == 0)).sum()) and won == int(((base == 0) & (tuned == 1)).sum())
        assert p == pytest.approx(binomtest(won, lost + won, 0.5, alternative="two-sided").pvalue, rel=1e-12)
    # statsmodels' mcnemar(exact=True) on [[a, b], [c, d]] is 2 * P(Binom(b + c, 1/2) <= min(b, c)): by hand.
    assert mcnemar_exact([1] * 10 + [0], [0] * 10 + [1])[2] == pytest.approx(2 * 12 / 2**11)
    assert mcnemar_exact([1, 0, 1], [1, 0, 1]) == (0, 0, 1.0)


def test_vectorised_f1_and_pearson_match_the_tasks_own_aggregations():
    import numpy as np

    from sabia_ift.evaluation.tasks import utils
    from sabia_ift.significance import CORPUS_STATISTICS

    rng = np.random.default_rng(5)
    labels = ["Sim", "Não", "Talvez"]
    pairs = [(labels[g], labels[p] if p < 3 else None) for g, p in zip(rng.integers(0, 3, 60), rng.integers(0, 4, 60))]
    index = rng.integers(0, 60, size=(50, 60))
    index[0] = np.where(index[0] % 3 == 0, 0, 1)  # a resample with one or two gold classes only
    got = CORPUS_STATISTICS["f1_macro"](pairs, index)
    assert got == pytest.approx([utils.f1_macro([pairs[i] for i in row]) for row in index], abs=1e-12)
    scores = [(float(a), float(b)) for a, b in zip(rng.uniform(1, 5, 40), rng.uniform(1, 5, 40))]
    index = rng.integers(0, 40, size=(30, 40))
    index[0] = 7  # constant: undefined, as utils.pearson says
    got = CORPUS_STATISTICS["pearson"](scores, index)
    assert np.isnan(got[0])
    assert got[1:] == pytest.approx([np.corrcoef(*zip(*[scores[i] for i in row]))[0, 1] for row in index[1:]])


def test_benchmark_test_accuracy_interval_and_verdict():
    from sabia_ift.significance import benchmark_test, paired_bootstrap

    base = [1.0] * 30 + [0.0] * 90
    tuned = [1.0] * 30 + [1.0] * 30 + [0.0] * 60  # 30 more right, none lost: significant
    result = benchmark_test("acc", base, tuned)
    interval = paired_bootstrap(base, tuned)
    assert result["test"] == "mcnemar_exact" and result["significant"] is True
    assert result["ci95"] == [round(interval.low, 4), round(interval.high, 4)] and result["ci95"][0] > 0
    assert result["discordant"] == {"base_only": 0, "tuned_only": 30}
    # One more right answer in 120: noise.
    noise = benchmark_test("acc", base, [1.0] * 31 + [0.0] * 89)
    assert noise["significant"] is False and noise["ci95"][0] <= 0 <= noise["ci95"][1] and noise["p_value"] == 1.0
    assert benchmark_test("acc", [1.0], [0.0])["test"] is None


def test_benchmark_test_bootstrap_for_f1_and_pearson():
    import numpy as np

    from sabia_ift.evaluation.tasks import utils
    from sabia_ift.significance import benchmark_test

    rng = np.random.default_rng(2)
    gold = ["Sim" if g else "Não" for g in rng.random(200) < 0.5]
    flip = {"Sim": "Não", "Não": "Sim"}
    base = [(g, g if rng.random() < 0.55 else flip[g]) for g in gold]
    tuned = [(g, g if rng.random() < 0.85 else flip[g]) for g in gold]
    result = benchmark_test("f1_macro", base, tuned)
    change = utils.f1_macro(tuned) - utils.f1_macro(base)
    assert result["test"] == "paired_bootstrap" and result["significant"] is True
    assert result["ci95"][0] < change < result["ci95"][1] and result["ci95"][0] > 0 and result["p_value"] < 0.05
    same = benchmark_test("f1_macro", base, base)
    assert same["ci95"] == [0.0, 0.0] and same["significant"] is False and same["p_value"] == 1.0

    x = rng.uniform(1, 5, 150)
    base_sts = [(float(a), float(a + rng.normal(0, 2))) for a in x]
    tuned_sts = [(float(a), float(a + rng.normal(0, 0.5))) for a in x]
    result = benchmark_test("pearson", base_sts, tuned_sts)
    assert result["significant"] is True and result["ci95"][0] > 0 and result["undefined_resamples"] == 0
    # Constant answers: Pearson undefined on every resample, so no test rather than a made-up one.
    constant = benchmark_test("pearson", [(a, 5.0) for a, _ in base_sts], tuned_sts)
    assert constant["test"] is None and constant["undefined_resamples"] == 2000
