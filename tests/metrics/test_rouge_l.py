"""Tests for sabia_ift/evaluation/metrics/rouge_l and for `load_metric` itself."""

from __future__ import annotations

import sys
import unicodedata

import evaluate
import pytest

from sabia_ift.evaluation.metrics import load_metric


@pytest.fixture(scope="module")
def rouge_l(offline_metric) -> evaluate.EvaluationModule:
    return offline_metric("rouge_l")


def _score(metric: evaluate.EvaluationModule, prediction: str, reference: str) -> float:
    return metric.compute(predictions=[prediction], references=[reference])["rougeL"]


def test_hand_computed_example(rouge_l: evaluate.EvaluationModule) -> None:
    # reference:  o gato preto dormiu no sofá   (6 tokens)
    # prediction: o gato dormiu no tapete       (5 tokens)
    # LCS = "o gato dormiu no" = 4 -> P = 4/5, R = 4/6, F1 = 2*4/(5+6) = 8/11.
    result = rouge_l.compute(
        predictions=["o gato dormiu no tapete"],
        references=["o gato preto dormiu no sofá"],
    )
    assert result["rougeL"] == pytest.approx(8 / 11)
    # Checks the (target, prediction) argument order: swapped, P and R swap.
    assert result["rougeL_precision"] == pytest.approx(4 / 5)
    assert result["rougeL_recall"] == pytest.approx(4 / 6)


def test_mean_over_examples_with_empty_prediction(rouge_l: evaluate.EvaluationModule) -> None:
    result = rouge_l.compute(
        predictions=["o gato dormiu no tapete", "", "bom dia"],
        references=["o gato preto dormiu no sofá", "qualquer coisa", "bom dia"],
    )
    assert result["rougeL"] == pytest.approx((8 / 11 + 0.0 + 1.0) / 3)
    assert set(result) == {"rougeL", "rougeL_precision", "rougeL_recall"}
    assert all(type(v) is float for v in result.values())


def test_per_prediction_f1(rouge_l: evaluate.EvaluationModule) -> None:
    result = rouge_l.compute(
        predictions=["o gato dormiu no tapete", "", "bom dia"],
        references=["o gato preto dormiu no sofá", "qualquer coisa", "bom dia"],
        per_prediction=True,
    )
    assert result["rougeL_per_prediction"] == [pytest.approx(8 / 11), 0.0, 1.0]
    assert result["rougeL"] == pytest.approx(sum(result["rougeL_per_prediction"]) / 3)


def test_identical_and_disjoint(rouge_l: evaluate.EvaluationModule) -> None:
    text = "A capital do Brasil é Brasília."
    assert _score(rouge_l, text, text) == 1.0
    assert _score(rouge_l, "um dois três", "quatro cinco seis") == 0.0


def test_no_examples_gives_zero(rouge_l: evaluate.EvaluationModule) -> None:
    result = rouge_l.compute(predictions=[], references=[])
    assert result == {"rougeL": 0.0, "rougeL_precision": 0.0, "rougeL_recall": 0.0}


def test_portuguese_accents_are_kept(rouge_l: evaluate.EvaluationModule) -> None:
    assert _score(rouge_l, "não", "não") == 1.0
    assert _score(rouge_l, "não é", "nao e") < 1.0
    # rouge_score's default tokenizer fails both of these: it drops "é"
    # entirely (score 0) and turns "ação" into "a o" (full match).
    assert _score(rouge_l, "é", "é") == 1.0
    assert _score(rouge_l, "ação", "a o") == 0.0


def test_case_punctuation_and_unicode_normalisation(rouge_l: evaluate.EvaluationModule) -> None:
    decomposed = unicodedata.normalize("NFD", "não é")
    assert decomposed != "não é"
    assert _score(rouge_l, decomposed, "não é") == 1.0
    assert _score(rouge_l, "NÃO, É!", "não é") == 1.0


def test_tokenizer_rule(rouge_l: evaluate.EvaluationModule) -> None:
    tokenizer_cls = sys.modules[type(rouge_l).__module__].UnicodeWordTokenizer
    tokens = tokenizer_cls().tokenize("Não é_bom, São Paulo 2024!")
    assert tokens == ["não", "é", "bom", "são", "paulo", "2024"]


def test_load_metric_refuses_unknown_names() -> None:
    with pytest.raises(ValueError, match="chrf, repetition, rouge_l"):
        load_metric("rouge")
    with pytest.raises(ValueError):
        load_metric("../metrics/rouge_l")
