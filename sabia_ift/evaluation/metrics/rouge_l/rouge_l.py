"""ROUGE-L (LCS-based F1) with a Unicode-aware tokenizer, as a local `evaluate` module.

The Hub "rouge" metric cannot be loaded offline, and `rouge_score`'s default
tokenizer keeps only [a-z0-9], so Portuguese "não" becomes ["n", "o"] and "é"
disappears. This module supplies its own tokenizer so accented words survive.
"""

from __future__ import annotations

import re
import unicodedata

import datasets
import evaluate
from rouge_score import rouge_scorer
from rouge_score import tokenizers

_DESCRIPTION = """\
ROUGE-L: F1 (with precision and recall) of the longest common subsequence of
word tokens between each prediction and its reference, averaged over examples.
Tokens are lowercased, NFC-normalised runs of Unicode letters/digits, so
accented Portuguese words are kept intact. No stemming is applied (the Porter
stemmer bundled with rouge_score is English-only).
"""

_CITATION = """\
@inproceedings{lin-2004-rouge,
    title = "{ROUGE}: A Package for Automatic Evaluation of Summaries",
    author = "Lin, Chin-Yew",
    booktitle = "Text Summarization Branches Out",
    year = "2004",
    publisher = "Association for Computational Linguistics",
    pages = "74--81",
}
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (list of str): generated texts.
    references (list of str): one reference text per prediction.
    per_prediction (bool, optional): also return each prediction's F1 (default False).
Returns:
    rougeL (float): mean ROUGE-L F1 over examples, in [0, 1].
    rougeL_precision (float): mean LCS precision over examples.
    rougeL_recall (float): mean LCS recall over examples.
    rougeL_per_prediction (list of float): each example's F1, only with per_prediction=True.
    An empty prediction or reference scores 0; no examples gives 0.0 everywhere.
Example:
    >>> metric = evaluate.load("sabia_ift/metrics/rouge_l")
    >>> metric.compute(predictions=["não é"], references=["não é"])["rougeL"]
    1.0
"""

# `[^\W_]` is \w without the underscore: Unicode letters and digits only.
_WORD_RE = re.compile(r"[^\W_]+")


class UnicodeWordTokenizer(tokenizers.Tokenizer):
    """Lowercased runs of Unicode letters/digits, NFC-normalised.

    NFC first so a decomposed "a" + combining tilde equals the precomposed
    "ã" (otherwise the combining mark, not being \\w, would split the word);
    again after lowercasing because case mapping can emit decomposed forms.
    """

    def tokenize(self, text: str | None) -> list[str]:
        if not text:
            return []
        normalised = unicodedata.normalize("NFC", unicodedata.normalize("NFC", text).lower())
        return _WORD_RE.findall(normalised)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RougeL(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Value("string"),
                }
            ),
            reference_urls=["https://aclanthology.org/W04-1013/"],
        )

    def _compute(
        self, predictions: list[str], references: list[str], per_prediction: bool = False
    ) -> dict[str, float | list[float]]:
        scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=UnicodeWordTokenizer())
        f1: list[float] = []
        precision: list[float] = []
        recall: list[float] = []
        for prediction, reference in zip(predictions, references, strict=True):
            # rouge_score takes (target, prediction); swapping them would swap P and R.
            score = scorer.score(reference or "", prediction or "")["rougeL"]
            f1.append(score.fmeasure)
            precision.append(score.precision)
            recall.append(score.recall)
        result: dict[str, float | list[float]] = {
            "rougeL": _mean(f1),
            "rougeL_precision": _mean(precision),
            "rougeL_recall": _mean(recall),
        }
        if per_prediction:
            result["rougeL_per_prediction"] = [float(v) for v in f1]
        return result


def _mean(values: list[float]) -> float:
    # Plain float so results serialise to JSON/DVC metrics without numpy types.
    return float(sum(values) / len(values)) if values else 0.0
