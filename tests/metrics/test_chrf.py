"""Tests for sabia_ift/metrics/chrf."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import evaluate
import pytest

from sabia_ift.metrics import load_metric


def _go_offline(mp: pytest.MonkeyPatch, hf_home: Path) -> None:
    # evaluate reads these env vars at import time, so its config attributes are
    # patched too; the socket guard turns any hidden Hub access into a failure.
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_EVALUATE_OFFLINE", "1")
    mp.setenv("HF_MODULES_CACHE", str(hf_home / "modules"))
    mp.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
    mp.setattr(evaluate.config, "HF_MODULES_CACHE", hf_home / "modules")
    mp.setattr(evaluate.config, "HF_METRICS_CACHE", hf_home / "metrics")

    def _refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access attempted in an offline metric test")

    mp.setattr(socket.socket, "connect", _refuse)


@pytest.fixture(scope="module")
def chrf(tmp_path_factory: pytest.TempPathFactory) -> Iterator[evaluate.EvaluationModule]:
    # Session-wide modules cache (basetemp); see test_rouge_l.py for why.
    with pytest.MonkeyPatch.context() as mp:
        _go_offline(mp, tmp_path_factory.getbasetemp() / "hf")
        yield load_metric("chrf", keep_in_memory=True)


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


def test_mismatched_lengths_are_refused(chrf: evaluate.EvaluationModule) -> None:
    with pytest.raises(ValueError):
        chrf.compute(predictions=["a", "b"], references=["a"])
