"""Stage tokenize: token ids and loss labels with the base model's tokenizer (section `tokenize`)."""

import argparse
import sys

from sabia_ift import stage
from sabia_ift.artifacts import read_contaminated, split_metrics
from sabia_ift.config import load_section
from sabia_ift.data.tokenization import summary, tokenize
from sabia_ift.io import write_json
from sabia_ift.modeling import load_tokenizer, model_context_length, model_folder, resolve_base

# In the detail file only: length distributions and rare edge counts would add a
# dozen columns to `dvc metrics show` and `dvc exp show`.
DETAIL_ONLY = ("length", "rows_in", "boundary_fallback", "dropped_prompt_too_long", "max_length", "overlength")


def main(args: argparse.Namespace) -> None:
    cfg = load_section("tokenize", args.params)
    folder = model_folder(resolve_base(args.base))
    # The contamination stage's list (policy drop; empty otherwise). Without the flag nothing is dropped.
    contaminated = read_contaminated(args.contamination) if args.contamination else frozenset()
    metrics = tokenize(cfg, load_tokenizer(folder), model_context_length(folder), args.formatted, args.out,
                       contaminated)
    compact, detail = split_metrics(metrics, DETAIL_ONLY)
    if args.detail:
        write_json(args.detail, detail)
    write_json(args.metrics, compact)
    print(summary(metrics))


if __name__ == "__main__":
    sys.exit(stage.run(main, __doc__, "base", "formatted", "out", "metrics", optional=("detail", "contamination")))
