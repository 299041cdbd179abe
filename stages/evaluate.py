"""Stage evaluate: tuned generations and losses on held-out data beside evaluate_base's (section `evaluate`)."""

import argparse
import sys

from sabia_ift import stage
from sabia_ift.config import load_section
from sabia_ift.evaluation.evaluation import evaluate
from sabia_ift.io import write_json


def main(args: argparse.Namespace) -> None:
    metrics = evaluate(load_section("evaluate", args.params), args.base, args.adapter, args.formatted,
                       args.tokenized, args.base_results, args.samples, args.prompts)
    write_json(args.metrics, metrics)
    if "base" in metrics:
        print(f"evaluated: base {metrics['base']}\n           tuned {metrics['tuned']}")
    else:
        print(f"evaluate skipped: {metrics['skipped']}")


if __name__ == "__main__":
    sys.exit(stage.run(main, __doc__, "base", "adapter", "formatted", "tokenized", "base_results", "samples",
                       "prompts", "metrics"))
