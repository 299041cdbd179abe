"""Stage contamination: training rows sharing word n-grams with the test split or a benchmark item
(section `contamination`; the benchmark's tasks and seed, to read its items as the benchmark stage does)."""

import argparse
import sys

from sabia_ift import stage
from sabia_ift.config import load_section
from sabia_ift.data.contamination import run_stage
from sabia_ift.io import write_json


def main(args: argparse.Namespace) -> None:
    metrics = run_stage(load_section("contamination", args.params), load_section("benchmark", args.params),
                        args.formatted, args.out)
    write_json(args.metrics, metrics)
    shares = ", ".join(f"{name} {t['rows_flagged']}" for name, t in metrics["targets"].items())
    print(f"contamination: {metrics['rows_flagged']} of {metrics['rows_checked']} training rows flagged "
          f"({shares}); {metrics['rows_dropped']} dropped (policy {metrics['policy']})")


if __name__ == "__main__":
    sys.exit(stage.run(main, __doc__, "formatted", "out", "metrics"))
