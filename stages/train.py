"""Stage train: LoRA / QLoRA on the tokenized split, resumable, on one or more devices (section `train`)."""

import argparse
import sys

from sabia_ift import stage
from sabia_ift.config import load_section
from sabia_ift.io import write_json
from sabia_ift.train import distributed
from sabia_ift.train.training import train


def main(args: argparse.Namespace) -> None:
    cfg = load_section("train", args.params)
    processes = distributed.requested_processes(cfg.devices, cfg.device)
    if distributed.needs_launch(processes):
        code = distributed.launch(processes, "stages.train", sys.argv[1:])
        if code:
            raise SystemExit(code)
        return
    done = train(cfg, args.base, args.data, args.out, args.checkpoints, args.live)
    if done is not None:  # the main process writes; the others only trained
        results, timings = done
        write_json(args.metrics, results)
        write_json(args.timings, timings)
        print(f"trained: {results}\ntimings: {timings}")


if __name__ == "__main__":
    sys.exit(stage.run(main, __doc__, "base", "data", "out", "checkpoints", "metrics", "timings", optional=("live",)))
