"""Which rows a benchmark task scores and shows: seeded, stratified draws; duplicates removed and counted."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections import Counter

import pytest

from conftest import REPO
from sabia_ift.evaluation import sampling


def parity(n_par: int, n_impar: int) -> list[dict]:
    """A classification file sorted by label, as files often are."""
    return ([{"id": str(i), "text": f"O número é {2 * i}.", "label": "par", "labels": ["par", "ímpar"]}
             for i in range(n_par)]
            + [{"id": str(n_par + i), "text": f"O número é {2 * i + 1}.", "label": "ímpar",
                "labels": ["par", "ímpar"]} for i in range(n_impar)])


def question(i: int, answer: str = "A", **extra) -> dict:
    return {"id": str(i), "question": f"Quanto é {i} + {i}?", "choices": [str(2 * i), "0", "1"],
            "answer": answer, **extra}


def test_limit_draws_both_classes_of_a_label_sorted_file_in_proportion():
    rows = parity(100, 50)
    chosen = sampling.select("classification", rows, None, num_fewshot=0, limit=30, seed=1234)
    assert Counter(r["label"] for r in chosen.test) == {"par": 20, "ímpar": 10}
    # The first 30 rows, what the stage scored before, hold one class only.
    assert {r["label"] for r in rows[:30]} == {"par"}
    assert chosen.available == 150 and len(chosen.test) == 30
    # Scored rows keep the file's order, and a constant answer scores what it would on the file.
    assert [int(r["id"]) for r in chosen.test] == sorted(int(r["id"]) for r in chosen.test)
    assert sampling.majority_baseline("classification", chosen.test, "f1_macro") == pytest.approx(0.4)
    assert sampling.majority_baseline("classification", rows[:30], "f1_macro") == 1.0


def test_proportional_quotas_give_every_seat_by_largest_remainder():
    assert sampling.proportional_quotas({"a": 30, "b": 10, "c": 1}, 7) == {"a": 5, "b": 2, "c": 0}
    # 10 seats over three equal classes: the leftover seat goes by the label's text.
    assert sampling.proportional_quotas({"z": 5, "y": 5, "x": 5}, 10) == {"x": 4, "y": 3, "z": 3}
    for k in range(1, 42):
        quotas = sampling.proportional_quotas({"a": 30, "b": 10, "c": 1}, k)
        assert sum(quotas.values()) == k
        assert all(abs(quotas[c] - k * n / 41) < 1 for c, n in {"a": 30, "b": 10, "c": 1}.items())


def test_the_draw_is_the_same_for_a_seed_and_another_for_another_seed():
    rows = parity(60, 40)

    def draw(seed):
        chosen = sampling.select("classification", rows, None, num_fewshot=4, limit=20, seed=seed)
        return [r["id"] for r in chosen.fewshot], [r["id"] for r in chosen.test]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)
    # Stratification does not depend on the seed: the shares are the file's.
    fewshot, test = draw(8)
    assert Counter(rows[int(i)]["label"] for i in test) == {"par": 12, "ímpar": 8}


def test_the_draw_does_not_depend_on_the_process():
    """String seeds and ordered containers only: another process, another hash seed, the same rows."""
    code = ("import json, sys; sys.path.insert(0, 'tests'); from test_sampling import parity; "
            "from sabia_ift.evaluation.sampling import select; "
            "c = select('classification', parity(60, 40), None, num_fewshot=4, limit=20, seed=5); "
            "print(json.dumps([[r['id'] for r in c.fewshot], [r['id'] for r in c.test]]))")
    runs = [subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": seed}).stdout
            for seed in ("1", "2")]
    here = sampling.select("classification", parity(60, 40), None, num_fewshot=4, limit=20, seed=5)
    assert json.loads(runs[0]) == json.loads(runs[1]) == [[r["id"] for r in here.fewshot],
                                                          [r["id"] for r in here.test]]


def test_without_a_gold_answer_the_sample_is_plain_random():
    rows = [{"id": str(i), "premise": f"Frase {i}.", "hypothesis": "Outra.", "score": 1 + i % 5}
            for i in range(50)]
    chosen = sampling.select("assin2_sts", rows, None, num_fewshot=0, limit=10, seed=3)
    assert len(chosen.test) == 10 and [r["id"] for r in chosen.test] != [str(i) for i in range(10)]
    assert sampling.majority_baseline("assin2_sts", chosen.test, "pearson") is None


def test_fewshot_examples_never_overlap_the_scored_rows():
    rows = parity(30, 30)
    for seed in range(20):
        chosen = sampling.select("classification", rows, None, num_fewshot=5, limit=None, seed=seed)
        shown = {sampling.prompt_key(r, "classification") for r in chosen.fewshot}
        assert len(chosen.fewshot) == 5
        assert not shown & {sampling.prompt_key(r, "classification") for r in chosen.test}
        assert len(chosen.test) == 55 == chosen.available


def test_rows_repeating_a_fewshot_example_or_each_other_are_removed_and_counted():
    pool = [question(1), question(2)]
    rows = [question(1),                                                   # a few-shot example
            question(3),
            {**question(3), "question": "QUANTO  É 3 + 3?", "id": "3b"},  # case and spacing
            {**question(4), "question": "Quanto é 4\u00a0+ 4?\u200b"},   # no-break and zero-width spaces
            question(4),
            question(5),
            {**question(5), "choices": ["10", "1", "0"]}]                   # other choices: another item
    chosen = sampling.select("multiple_choice", rows, pool, num_fewshot=2, limit=None, seed=0)
    assert [r["id"] for r in chosen.fewshot] in (["1", "2"], ["2", "1"])
    assert [r["id"] for r in chosen.test] == ["3", "4", "5", "5"]
    assert chosen.fewshot_duplicates_removed == 1 and chosen.duplicates_removed == 2
    assert chosen.available == 4


def test_the_leaderboards_listed_examples_are_kept_when_they_cover_the_count():
    pool = [question(i) for i in range(10)]
    listed = [pool[7], pool[2], pool[5]]
    chosen = sampling.select("enem", pool, None, num_fewshot=3, limit=None, seed=0, listed=listed)
    assert chosen.fewshot == listed
    # Asked for more than the leaderboard lists: a seeded draw instead.
    more = sampling.select("enem", pool, None, num_fewshot=4, limit=None, seed=0, listed=listed)
    assert len(more.fewshot) == 4 and more.fewshot[:3] != listed


def test_majority_baseline_under_each_metric():
    rows = [question(i, answer) for i, answer in enumerate("AAABBC")]
    assert sampling.majority_baseline("multiple_choice", rows, "acc") == 0.5
    # Macro F1 over the gold classes: "A" gets 2*3/(2*3+3) = 2/3, B and C 0.
    assert sampling.majority_baseline("multiple_choice", rows, "f1_macro") == pytest.approx(round(2 / 9, 4))


def test_a_constant_answer_that_scores_well_is_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="sabia_ift.evaluation.sampling"):
        one_class = parity(5, 0)
        sampling.warn_if_constant_wins("so_par", "classification", one_class,
                                       sampling.majority_baseline("classification", one_class, "f1_macro"))
        mostly_a = [question(i, answer) for i, answer in enumerate("AAAAB")]
        sampling.warn_if_constant_wins("quase_a", "multiple_choice", mostly_a, 0.8)
        balanced = [question(i, answer) for i, answer in enumerate("ABCAB")]
        sampling.warn_if_constant_wins("ok", "multiple_choice", balanced, 0.4)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "so_par: every scored item has the answer 'par'" in messages[0]
    assert "quase_a: always answering 'A' scores 0.8000 (4 of 5 items)" in messages[1]
