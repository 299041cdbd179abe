"""What an experiment costs stage by stage, through DVC itself: a first `dvc repro`, then a
`dvc exp run` that changes only `train.lr`.

    python bench/experiment_wall.py --out bench/results [--lr 0.0003] [--first-done]

Run it in a throwaway clone: `dvc exp run` changes that clone's workspace. Every
stage run writes logs/cost/<stage>.json (sabia_ift/cost.py: wall time from the
stage process's start); the stages a command ran are those whose record started
after the command did. --first-done reads the first experiment from the records
a `make repro` in this clone left, instead of running `dvc repro` here.

Writes <out>/<machine>-<date>-experiment-wall.json: `exp_wall_s_by_stage`
({"first": {stage: s}, "lr_only": {stage: s}}), what each command took in all,
and `lr_only_eval_share`: the evaluate and benchmark stages' wall time over the
train stage's in the lr-only experiment.
"""

from __future__ import annotations

import argparse
import calendar
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from repro_check import cpu_summary  # noqa: E402

EVALUATION = ("evaluate_base", "evaluate", "benchmark_base", "benchmark")


def records(since: float) -> dict[str, float]:
    """Wall seconds of each stage whose cost record started at or after `since` (epoch seconds)."""
    out = {}
    for path in sorted((ROOT / "logs" / "cost").glob("*.json")):
        record = json.loads(path.read_text())
        started = calendar.timegm(time.strptime(record["started"], "%Y-%m-%dT%H:%M:%SZ"))
        if started >= since - 1:  # the record's start is rounded down to the second
            out[path.stem] = record["wall_s"]
    return out


def dvc(*args: str) -> float:
    """Run a DVC command in this project with the interpreter's tools first on PATH; its wall seconds."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dvc", *args], cwd=ROOT, env=env, check=True)
    return round(time.perf_counter() - start, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lr", default="0.0003", help="train.lr of the second experiment")
    parser.add_argument("--first-done", action="store_true",
                        help="take the first experiment from the cost records already here")
    args = parser.parse_args()

    result: dict = {"cpu": cpu_summary(), "date": time.strftime("%Y-%m-%d"), "lr": args.lr, "command_s": {}}
    try:
        import torch

        if torch.cuda.is_available():
            result["card"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    if args.first_done:
        first = records(0.0)
    else:
        start = time.time()
        result["command_s"]["first"] = dvc("repro")
        first = records(start)
    start = time.time()
    result["command_s"]["lr_only"] = dvc("exp", "run", "-S", f"train.lr={args.lr}")
    lr_only = records(start)
    result["exp_wall_s_by_stage"] = {"first": first, "lr_only": lr_only}
    train = lr_only.get("train")
    evaluation = sum(lr_only.get(name, 0.0) for name in EVALUATION)
    result["lr_only_eval_share"] = round(evaluation / train, 3) if train else None
    machine = result.get("card") or result["cpu"]["model"]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{machine.replace(' ', '-').replace('(R)', '').lower()}-{result['date']}-experiment-wall.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
