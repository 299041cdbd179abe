"""Stage train: LoRA / QLoRA on the tokenized split, resumable from checkpoints (section `train`)."""

import argparse
import sys
from pathlib import Path

from sabia_ift import stage
from sabia_ift.artifacts import CHECKPOINTS_NOTE
from sabia_ift.config import load_section
from sabia_ift.io import write_json, write_text
from sabia_ift.train.training import train


def main(args: argparse.Namespace) -> None:
    metrics = train(load_section("train", args.params), args.base, args.data, args.out,
                    args.checkpoints, args.live)
    # A finished run empties the checkpoints; a note keeps the folder from being an empty
    # DVC output, which DVC warns about on every run.
    write_text(Path(args.checkpoints, CHECKPOINTS_NOTE),
               "Checkpoints of an interrupted train stage appear here; `dvc repro` resumes from the last one.\n")
    write_json(args.metrics, metrics)
    print(f"trained: {metrics}")


if __name__ == "__main__":
    sys.exit(stage.run(main, __doc__, "base", "data", "out", "checkpoints", "metrics", optional=("live",)))
