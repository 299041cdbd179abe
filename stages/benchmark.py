"""Stage benchmark: lm-evaluation-harness tasks on the tuned model, beside benchmark_base's (section `benchmark`)."""

import argparse
import sys

from sabia_ift import stage
from sabia_ift.config import load_section
from sabia_ift.evaluation.benchmark import run_benchmark
from sabia_ift.io import write_json


def main(args: argparse.Namespace) -> None:
    metrics, _ = run_benchmark(load_section("benchmark", args.params), args.base, args.adapter,
                               base_results=args.base_results)
    write_json(args.metrics, metrics)
    for name, m in metrics.items():
        constant = "" if m["majority_baseline"] is None else f", a constant answer {m['majority_baseline']}"
        test = "" if m["ci95"] is None else f", 95% interval {m['ci95']}, p {m['p_value']}"
        print(f"{name}: {m['metric']} base {m['base']} tuned {m['tuned']}{constant}{test} "
              f"({m['n']} of {m['n_available']} examples, {m['num_fewshot']}-shot)")


if __name__ == "__main__":
    sys.exit(stage.run(main, __doc__, "base", "adapter", "base_results", "metrics"))
