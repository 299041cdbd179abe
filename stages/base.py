"""Stage base: build the tiny default model, or pin and check a pretrained one (section `base`)."""

import argparse
import sys

from sabia_ift import stage
from sabia_ift.base_model import prepare_base
from sabia_ift.config import load_section


def main(args: argparse.Namespace) -> None:
    info = prepare_base(load_section("base", args.params), args.out)
    print(f"base model ready in {args.out}: {info}")


if __name__ == "__main__":
    sys.exit(stage.run(main, __doc__, "out"))
