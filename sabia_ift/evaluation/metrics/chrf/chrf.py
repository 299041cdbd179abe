"""Corpus-level chrF (sacrebleu), as a local `evaluate` module.

Character n-grams need no word tokenizer, so accents are compared as they are
written; that makes chrF a useful complement to ROUGE-L for Portuguese, where
inflection makes exact word matches brittle.
"""

from __future__ import annotations

import datasets
import evaluate
from sacrebleu.metrics import CHRF

_DESCRIPTION = """\
chrF: character n-gram F-score (beta = 2, character order 6) between the
predictions and their references, computed at corpus level by sacrebleu and
reported on a 0-100 scale. With the default word_order=0 this is chrF, not
chrF++ (pass word_order=2 for chrF++).
"""

_CITATION = """\
@inproceedings{popovic-2015-chrf,
    title = "chr{F}: character n-gram {F}-score for automatic {MT} evaluation",
    author = "Popovi{\\'c}, Maja",
    booktitle = "Proceedings of the Tenth Workshop on Statistical Machine Translation",
    year = "2015",
    pages = "392--395",
}
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (list of str): generated texts.
    references (list of str): one reference text per prediction.
    word_order (int, optional): word n-gram order; 0 (default) gives chrF, 2 gives chrF++.
    per_prediction (bool, optional): also return each pair's sentence-level score (default False).
Returns:
    chrf (float): corpus-level score in [0, 100]; 0.0 when there are no examples.
    chrf_per_prediction (list of float): sentence-level chrF of each pair, only with
        per_prediction=True. Their mean is not the corpus score: the corpus score pools
        the n-gram counts of all pairs before taking the F-score.
Example:
    >>> metric = evaluate.load("sabia_ift/metrics/chrf")
    >>> metric.compute(predictions=["não é"], references=["não é"])["chrf"]
    100.0
"""

_CHAR_ORDER = 6


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Chrf(evaluate.Metric):
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
            codebase_urls=["https://github.com/mjpost/sacrebleu"],
            reference_urls=["https://aclanthology.org/W15-3049/"],
        )

    def _compute(
        self,
        predictions: list[str],
        references: list[str],
        word_order: int = 0,
        per_prediction: bool = False,
    ) -> dict[str, float | list[float]]:
        if len(predictions) != len(references):
            raise ValueError(
                f"chrf needs one reference per prediction, got {len(predictions)} "
                f"predictions and {len(references)} references"
            )
        if not predictions:
            return {"chrf": 0.0, **({"chrf_per_prediction": []} if per_prediction else {})}
        chrf = CHRF(char_order=_CHAR_ORDER, word_order=word_order)
        predictions = [p or "" for p in predictions]
        references = [r or "" for r in references]
        # sacrebleu expects a list of reference *streams*; we have a single stream.
        score = chrf.corpus_score(predictions, [references])
        result: dict[str, float | list[float]] = {"chrf": float(score.score)}
        if per_prediction:
            result["chrf_per_prediction"] = [
                float(chrf.sentence_score(p, [r]).score) for p, r in zip(predictions, references)
            ]
        return result
