"""Stage benchmark: lm-evaluation-harness tasks, base vs tuned (section `benchmark`)."""

import argparse
import sys

from sabia_ift import stage
from sabia_ift.config import load_section
from sabia_ift.evaluation.benchmark import run_benchmark
from sabia_ift.io import write_json


def main(args: argparse.Namespace) -> None:
    metrics, _ = run_benchmark(load_section("benchmark", args.params), args.base, args.adapter)
    write_json(args.metrics, metrics)
    for name, m in metrics.items():
        constant = "" if m["majority_baseline"] is None else f", a constant answer {m['majority_baseline']}"
        print(f"{name}: {m['metric']} base {m['base']} tuned {m['tuned']}{constant} "
              f"({m['n']} of {m['n_available']} examples, {m['num_fewshot']}-shot)")


if __name__ == "__main__":
    sys.exit(stage.run(main, __doc__, "base", "adapter", "metrics"))
