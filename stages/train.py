"""Stage train: LoRA / QLoRA on the tokenized split, resumable, on one or more devices (section `train`)."""

import argparse
import sys
from pathlib import Path

from sabia_ift import stage
from sabia_ift.artifacts import CHECKPOINTS_NOTE
from sabia_ift.config import load_section
from sabia_ift.cost import note_gpus
from sabia_ift.io import write_json, write_text
from sabia_ift.modeling import pick_device
from sabia_ift.train import distributed
from sabia_ift.train.training import check_before_launch, train


def main(args: argparse.Namespace) -> None:
    cfg = load_section("train", args.params)
    processes = distributed.requested_processes(cfg.devices, cfg.device)
    if distributed.needs_launch(processes):
        check_before_launch(cfg, processes, args.base, args.data)
        if pick_device(cfg.device, "train.device") == "cuda":
            note_gpus(processes)  # one GPU a worker; the workers' CPU time is counted as children's
        code = distributed.launch(processes, "stages.train", sys.argv[1:])
        if code:
            raise SystemExit(code)
        return
    distributed.die_with_launcher()
    done = train(cfg, args.base, args.data, args.out, args.checkpoints, args.live, args.logs)
    if done is None:  # the main process writes; the others only trained
        return
    results, timings = done
    # A finished run empties the checkpoints; a note keeps the folder from being an empty
    # DVC output, which DVC warns about on every run.
    write_text(Path(args.checkpoints, CHECKPOINTS_NOTE),
               "Checkpoints of an interrupted train stage appear here; `dvc repro` resumes from the last one.\n")
    write_json(args.metrics, results)
    write_json(args.timings, timings)
    print(f"trained: {results}\ntimings: {timings}")


if __name__ == "__main__":
    distributed.restore_argv()
    sys.exit(stage.run(main, __doc__, "base", "data", "out", "checkpoints", "metrics", "timings",
                       optional=("live", "logs")))
