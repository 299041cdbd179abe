"""Stage train: LoRA / QLoRA on the tokenized split, resumable from checkpoints (section `train`)."""

import argparse
import sys

from sabia_ift import stage
from sabia_ift.config import load_section
from sabia_ift.io import write_json
from sabia_ift.train.training import train


def main(args: argparse.Namespace) -> None:
    metrics = train(load_section("train", args.params), args.base, args.data, args.out,
                    args.checkpoints, args.live)
    write_json(args.metrics, metrics)
    print(f"trained: {metrics}")


if __name__ == "__main__":
    sys.exit(stage.run(main, __doc__, "base", "data", "out", "checkpoints", "metrics", optional=("live",)))
