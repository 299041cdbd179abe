"""Tests for sabia_ift/evaluation/metrics/chrf."""

from __future__ import annotations

import evaluate
import pytest


@pytest.fixture(scope="module")
def chrf(offline_metric) -> evaluate.EvaluationModule:
    return offline_metric("chrf")


def _score(metric: evaluate.EvaluationModule, prediction: str, reference: str, **kwargs: int) -> float:
    return metric.compute(predictions=[prediction], references=[reference], **kwargs)["chrf"]


def test_identical_scores_100(chrf: evaluate.EvaluationModule) -> None:
    texts = ["O gato dormiu no sofá.", "Não é verdade."]
    result = chrf.compute(predictions=texts, references=texts)
    assert result == {"chrf": 100.0}
    assert type(result["chrf"]) is float


def test_closer_prediction_scores_higher(chrf: evaluate.EvaluationModule) -> None:
    reference = "o gato dormiu no sofá da sala"
    # The close prediction is a prefix of the reference, so every one of its
    # character n-grams is in the reference (precision 1) and recall is high;
    # the far one shares only scattered short n-grams ("o ", "a", "l").
    close = _score(chrf, "o gato dormiu no sofá", reference)
    far = _score(chrf, "um cachorro latiu lá fora", reference)
    assert 0.0 < far < close < 100.0


def test_accents_matter(chrf: evaluate.EvaluationModule) -> None:
    assert _score(chrf, "ação", "ação") == 100.0
    # "acao" vs "ação": only the unigrams a, c, o and nothing longer match.
    assert _score(chrf, "acao", "ação") < 50.0
    assert _score(chrf, "nao e", "não é") < 100.0


def test_empty_prediction_and_no_examples(chrf: evaluate.EvaluationModule) -> None:
    assert _score(chrf, "", "bom dia") == 0.0
    assert chrf.compute(predictions=[], references=[]) == {"chrf": 0.0}


def test_word_order_switches_to_chrf_plus_plus(chrf: evaluate.EvaluationModule) -> None:
    prediction, reference = "o gato dormiu", "o gato dormiu no sofá"
    assert _score(chrf, reference, reference, word_order=2) == 100.0
    # Default must be plain chrF, so it must differ from chrF++ on a partial match.
    assert _score(chrf, prediction, reference) != pytest.approx(
        _score(chrf, prediction, reference, word_order=2)
    )
    assert _score(chrf, prediction, reference) == pytest.approx(
        _score(chrf, prediction, reference, word_order=0)
    )


def test_per_prediction_is_each_pair_alone_and_keeps_the_corpus_score(chrf: evaluate.EvaluationModule) -> None:
    predictions = ["o gato dormiu no sofá", "um cachorro latiu", ""]
    references = ["o gato dormiu no sofá da sala", "um cachorro latiu lá fora", "bom dia"]
    result = chrf.compute(predictions=predictions, references=references, per_prediction=True)
    assert result["chrf"] == chrf.compute(predictions=predictions, references=references)["chrf"]
    assert result["chrf_per_prediction"] == [pytest.approx(_score(chrf, p, r)) for p, r in zip(predictions, references)]
    assert result["chrf_per_prediction"][2] == 0.0
    assert chrf.compute(predictions=[], references=[], per_prediction=True) == {"chrf": 0.0, "chrf_per_prediction": []}


def test_mismatched_lengths_are_refused(chrf: evaluate.EvaluationModule) -> None:
    with pytest.raises(ValueError):
        chrf.compute(predictions=["a", "b"], references=["a"])
