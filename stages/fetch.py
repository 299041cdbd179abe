"""Stage fetch: raw instruction rows and a manifest, from a local file or a pinned Hub dataset (section `fetch`)."""

import argparse
import sys

from sabia_ift import stage
from sabia_ift.config import load_section
from sabia_ift.data.sources import fetch


def main(args: argparse.Namespace) -> None:
    manifest = fetch(load_section("fetch", args.params), args.out)
    print(f"fetched {manifest['rows_written']} of {manifest['rows_in_source']} rows into {args.out}")


if __name__ == "__main__":
    sys.exit(stage.run(main, __doc__, "out"))
