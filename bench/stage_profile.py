"""The train stage itself under torch.profiler: where an optimizer step's time goes, on the host and on the card.

    python bench/stage_profile.py --out FILE [--wait 2] [--active 3] -- STAGE-ARGS...

STAGE-ARGS are those `python -m stages.train` takes (`--params P --base B --data D --out A
--checkpoints C --metrics M --timings T`); bench/side_by_side.py writes a params file per
row to its work folder (`params-ours-mb1.yaml`). The stage runs unchanged in this process;
the profiler records `--active` optimizer steps after `--wait` skipped ones and one warm-up, so the run
needs at least wait + active + 1 steps (train.max_steps). FILE gets every step's wall time
(step end to step end, as the stage's own timer counts) and the profiler's tables by host
time and by card time: a step whose host time exceeds its card time is host-bound.
"""

from __future__ import annotations

import argparse
import importlib
import runpy
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--wait", type=int, default=2)
    parser.add_argument("--active", type=int, default=3)
    parser.add_argument("stage_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    stage_args = args.stage_args[1:] if args.stage_args[:1] == ["--"] else args.stage_args

    sys.path.insert(0, str(REPO))
    # As in a stage script, sabia_ift.stage pins the CPU numerics before torch loads.
    importlib.import_module("sabia_ift.stage")
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    from sabia_ift.train import callbacks

    tables: list[str] = []

    def keep_tables(done) -> None:
        # A scheduled profile hands its steps over here once; key_averages() after the run is empty.
        averages = done.key_averages()
        tables.extend(["by host (self CPU) time:", averages.table(sort_by="self_cpu_time_total", row_limit=45), "",
                       "by card (self CUDA) time:", averages.table(sort_by="self_cuda_time_total", row_limit=30)])

    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], on_trace_ready=keep_tables,
                   schedule=schedule(wait=args.wait, warmup=1, active=args.active, repeat=1))
    ends: list[float] = []
    timer_end = callbacks.StepTimer.on_step_end

    def on_step_end(self, *a, **k):
        # The profiler's step boundary is the stage timer's: the same intervals.
        ends.append(time.perf_counter())
        prof.step()
        return timer_end(self, *a, **k)

    callbacks.StepTimer.on_step_end = on_step_end
    sys.argv = ["stages.train", *stage_args]
    with prof:
        try:
            runpy.run_module("stages.train", run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            if exc.code not in (0, None):
                raise
    steps = [round(b - a, 4) for a, b in zip(ends, ends[1:])]
    if not tables:
        raise SystemExit(f"the stage ran {len(ends)} steps: --wait {args.wait} --active {args.active} needs "
                         f"{args.wait + args.active + 1}")
    lines = [f"card: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}",
             f"stage args: {' '.join(stage_args)}",
             f"step wall times (s, step end to step end, from step 2): {steps}",
             f"profiled steps: {args.wait + 2} to {args.wait + 1 + args.active}", "", *tables]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"step wall times: {steps}\nwrote {args.out}")


if __name__ == "__main__":
    main()
