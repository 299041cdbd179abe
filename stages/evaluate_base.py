"""Stage evaluate_base: the base model's generations and losses on held-out data (section `evaluate`).

Its own stage so that an experiment that changes only the training reuses it (DVC's cache).
"""

import argparse
import sys

from sabia_ift import stage
from sabia_ift.config import base_loading, load_section
from sabia_ift.evaluation.evaluation import evaluate_base


def main(args: argparse.Namespace) -> None:
    summary = evaluate_base(load_section("evaluate", args.params), base_loading(args.params), args.base,
                            args.formatted, args.tokenized, args.out)
    print(f"evaluated base: {summary['base']}")


if __name__ == "__main__":
    sys.exit(stage.run(main, __doc__, "base", "formatted", "tokenized", "out"))
