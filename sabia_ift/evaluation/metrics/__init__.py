"""Evaluation metrics for base-vs-tuned comparisons, shipped as local `evaluate` modules.

Why local: `evaluate` 0.4.x ships no metric code, so `evaluate.load("rouge")`
fetches a script from the Hugging Face Hub and fails on an offline machine
(the pipeline's evaluation stage must run without network). `evaluate.load`
on a folder holding `<name>/<name>.py` works offline. Writing the modules
ourselves also lets ROUGE-L tokenize Portuguese correctly: `rouge_score`'s
default tokenizer reduces "não" to "n o".

Each module file must stay self-contained with one import per line: evaluate
copies only that file into its module cache and scans its import lines to
check dependencies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

METRICS_DIR = Path(__file__).resolve().parent
METRIC_NAMES: frozenset[str] = frozenset({"rouge_l", "chrf", "repetition"})

# Which way is better for each per-model metric in metrics/eval.json; reports
# and pull-request comments mark changes with it.
HIGHER_IS_BETTER = {"eos_stop_rate": True, "rougeL": True, "chrf": True, "exact_match": True,
                    "repetition": False, "val_loss": False, "val_perplexity": False}


def load_metric(name: str, **load_kwargs: Any):
    """Load one of the project's local metrics by name (an `evaluate.EvaluationModule`).

    `load_kwargs` go to `evaluate.load` (e.g. `experiment_id` when several
    processes compute the same metric over one shared cache directory).
    """
    if name not in METRIC_NAMES:
        raise ValueError(
            f"unknown metric {name!r}; valid names are: {', '.join(sorted(METRIC_NAMES))}"
        )
    import evaluate  # heavy (pulls in datasets); only the evaluate stage needs it

    # An absolute folder path (not a bare name) keeps evaluate from trying the Hub.
    return evaluate.load(str(METRICS_DIR / name), **load_kwargs)
