"""Tests for sabia_ift/evaluation/metrics/repetition."""

from __future__ import annotations

import evaluate
import pytest


@pytest.fixture(scope="module")
def repetition(offline_metric) -> evaluate.EvaluationModule:
    return offline_metric("repetition")


def _rep(metric: evaluate.EvaluationModule, text: str, **kwargs: int) -> float:
    return metric.compute(predictions=[text], **kwargs)["repetition"]


def test_looping_text_hand_computed(repetition: evaluate.EvaluationModule) -> None:
    # 12 tokens -> 9 four-grams: abcd bcda cdab dabc abcd bcda cdab dabc abcd;
    # 4 distinct, so rep_4 = 1 - 4/9 = 5/9.
    assert _rep(repetition, "a b c d a b c d a b c d", n=4) == pytest.approx(5 / 9)
    # n defaults to 4.
    assert _rep(repetition, "a b c d a b c d a b c d") == pytest.approx(5 / 9)


def test_non_repeating_and_short_texts_score_zero(repetition: evaluate.EvaluationModule) -> None:
    assert _rep(repetition, "O modelo respondeu à pergunta e parou logo em seguida.") == 0.0
    assert _rep(repetition, "oi tudo bem") == 0.0  # 3 tokens < n = 4
    assert _rep(repetition, "") == 0.0


def test_mean_and_max(repetition: evaluate.EvaluationModule) -> None:
    result = repetition.compute(
        predictions=["a b c d a b c d a b c d", "uma frase sem nenhuma repetição aqui", "curto"]
    )
    assert result["repetition"] == pytest.approx((5 / 9) / 3)
    assert result["repetition_max"] == pytest.approx(5 / 9)
    assert all(type(v) is float for v in result.values())
    assert repetition.compute(predictions=[]) == {"repetition": 0.0, "repetition_max": 0.0}


def test_per_prediction_rates(repetition: evaluate.EvaluationModule) -> None:
    predictions = ["a b c d a b c d a b c d", "uma frase sem nenhuma repetição aqui", "curto"]
    result = repetition.compute(predictions=predictions, per_prediction=True)
    assert result["repetition_per_prediction"] == [pytest.approx(5 / 9), 0.0, 0.0]
    assert result["repetition"] == repetition.compute(predictions=predictions)["repetition"]


def test_tokens_are_unicode_words(repetition: evaluate.EvaluationModule) -> None:
    # Case and punctuation ignored: 3 unigrams, 1 distinct -> 1 - 1/3.
    assert _rep(repetition, "Não, não... NÃO!", n=1) == pytest.approx(2 / 3)
    # Accents distinguish words: não/nao are two distinct unigrams -> 1 - 2/4.
    assert _rep(repetition, "não nao não nao", n=1) == pytest.approx(1 / 2)


def test_invalid_n_is_refused(repetition: evaluate.EvaluationModule) -> None:
    with pytest.raises(ValueError):
        repetition.compute(predictions=["a b"], n=0)
