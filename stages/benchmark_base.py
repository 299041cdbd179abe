"""Stage benchmark_base: lm-evaluation-harness tasks on the base model (section `benchmark`).

Its own stage so that an experiment that changes only the training reuses it (DVC's cache).
"""

import argparse
import sys

from sabia_ift import stage
from sabia_ift.config import base_loading, load_section
from sabia_ift.evaluation.benchmark import benchmark_base


def main(args: argparse.Namespace) -> None:
    record = benchmark_base(load_section("benchmark", args.params), base_loading(args.params), args.base, args.out)
    for name, task in record.items():
        print(f"{name}: base {task['metric']} {task['score']} ({task['n']} examples)")


if __name__ == "__main__":
    sys.exit(stage.run(main, __doc__, "base", "out"))
