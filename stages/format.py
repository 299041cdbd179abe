"""Stage format: clean rows, apply the prompt template, split train/val/test (section `format`)."""

import argparse
import sys

from sabia_ift import stage
from sabia_ift.config import load_section
from sabia_ift.data.formatting import format_rows
from sabia_ift.io import write_json


def main(args: argparse.Namespace) -> None:
    counts = format_rows(load_section("format", args.params), args.raw, args.out)
    write_json(args.metrics, counts)
    print(f"formatted: {counts}")


if __name__ == "__main__":
    sys.exit(stage.run(main, __doc__, "raw", "out", "metrics"))
