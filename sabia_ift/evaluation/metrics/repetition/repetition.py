"""Degenerate repetition in generations, as a local `evaluate` module.

A model that never emits EOS tends to loop ("e então e então e então ..."),
which overlap metrics against a reference only partly reveal. This module
measures the loop directly from the prediction, with no reference needed.
"""

from __future__ import annotations

import re
import unicodedata

import datasets
import evaluate

_DESCRIPTION = """\
Repetition rate of word n-grams within each prediction:
rep_n = 1 - (number of distinct n-grams / number of n-grams), which is 0 for
text without repeated n-grams and approaches 1 for text stuck in a loop. A
prediction with fewer than n tokens scores 0. Tokens are lowercased,
NFC-normalised runs of Unicode letters/digits.
"""

_CITATION = """\
@inproceedings{welleck-2020-unlikelihood,
    title = "Neural Text Generation With Unlikelihood Training",
    author = "Welleck, Sean and Kulikov, Ilia and Roller, Stephen and Dinan, Emily and Cho, Kyunghyun and Weston, Jason",
    booktitle = "International Conference on Learning Representations",
    year = "2020",
}
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (list of str): generated texts.
    n (int, optional): n-gram order, default 4.
    per_prediction (bool, optional): also return each prediction's rep_n (default False).
Returns:
    repetition (float): mean rep_n over predictions, in [0, 1).
    repetition_max (float): largest rep_n among the predictions.
    Both are 0.0 when there are no predictions.
    repetition_per_prediction (list of float): each prediction's rep_n, only with per_prediction=True.
Example:
    >>> metric = evaluate.load("sabia_ift/metrics/repetition")
    >>> round(metric.compute(predictions=["a b c d a b c d a b c d"], n=4)["repetition"], 4)
    0.5556
"""

# `[^\W_]` is \w without the underscore: Unicode letters and digits only.
_WORD_RE = re.compile(r"[^\W_]+")


class UnicodeWordTokenizer:
    """Lowercased runs of Unicode letters/digits, NFC-normalised.

    Same rule as the rouge_l module's tokenizer; it is repeated here because
    evaluate copies each module file on its own into its cache, so modules
    cannot import from a shared sibling package.
    """

    def tokenize(self, text: str | None) -> list[str]:
        if not text:
            return []
        normalised = unicodedata.normalize("NFC", unicodedata.normalize("NFC", text).lower())
        return _WORD_RE.findall(normalised)


def repetition_rate(tokens: list[str], n: int) -> float:
    """1 - distinct/total over the token n-grams; 0 when there is no n-gram."""
    total = len(tokens) - n + 1
    if total <= 0:
        return 0.0
    distinct = len({tuple(tokens[i : i + n]) for i in range(total)})
    return 1.0 - distinct / total


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Repetition(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
            reference_urls=["https://arxiv.org/abs/1908.04319"],
        )

    def _compute(
        self, predictions: list[str], n: int = 4, per_prediction: bool = False
    ) -> dict[str, float | list[float]]:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        tokenizer = UnicodeWordTokenizer()
        rates = [repetition_rate(tokenizer.tokenize(p), n) for p in predictions]
        result: dict[str, float | list[float]] = {
            "repetition": float(sum(rates) / len(rates)) if rates else 0.0,
            "repetition_max": float(max(rates)) if rates else 0.0,
        }
        if per_prediction:
            result["repetition_per_prediction"] = [float(r) for r in rates]
        return result
