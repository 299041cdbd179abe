"""Several GPUs (or CPU processes) for the train stage: PyTorch DDP through torchrun and the HF Trainer.

`train.devices` says how many processes train. With more than one, the stage
relaunches itself under `torch.distributed.run` (torchrun), so `dvc repro`
needs nothing else typed; each process loads the (4-bit) base on its own GPU
and DDP all-reduces the LoRA gradients, the only trainable weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

from ..errors import ConfigError

LAUNCHED = "SABIA_IFT_LAUNCHED"


@dataclass(frozen=True)
class World:
    size: int
    rank: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current_world() -> World:
    """This process's place, as torchrun describes it in the environment."""
    return World(int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")),
                 int(os.environ.get("LOCAL_RANK", "0")))


def requested_processes(devices: str | int, device: str) -> int:
    """How many processes `train.devices` asks for on this machine."""
    import torch

    from ..modeling import pick_device

    device = pick_device(device, "train.device")
    visible = torch.cuda.device_count() if device == "cuda" else 1
    if isinstance(devices, str):  # "auto"
        return max(visible, 1)
    if device == "cuda" and devices > visible:
        raise ConfigError(f"train.devices: {devices} GPUs asked for, {visible} visible")
    return int(devices)


def accumulation_per_process(grad_accum: int, world_size: int) -> int:
    """Keep the global batch of the params whatever the number of processes.

    `train.grad_accum` is the accumulation of a single process; N processes
    each accumulate grad_accum / N micro-batches, so one optimizer step sees the
    same number of micro-batches (and rows or tokens) on 1 or N devices.
    """
    if grad_accum % world_size:
        raise ConfigError(
            f"train.grad_accum: {grad_accum} micro-batches per step cannot be split evenly over {world_size} "
            f"processes (train.devices); use a multiple of {world_size} to keep the global batch")
    return grad_accum // world_size


def needs_launch(processes: int) -> bool:
    return processes > 1 and LAUNCHED not in os.environ and "LOCAL_RANK" not in os.environ


def launch(processes: int, module: str, argv: list[str]) -> int:
    """Run `python -m module argv` in `processes` processes under torchrun; returns its exit code.

    The stage's arguments travel in the environment, not on torchrun's command line:
    torchrun's parser matches option prefixes across the whole line, so a stage option
    such as `--logs` is refused as ambiguous with its `--logs-specs` (or, worse, a
    prefix of one of its options would be taken as that option).
    """
    env = {**os.environ, LAUNCHED: json.dumps(argv)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           "-m", module]
    return subprocess.call(cmd, env=env)


def restore_argv() -> None:
    """In a process `launch` started, put the stage's arguments back on sys.argv."""
    if LAUNCHED in os.environ and "LOCAL_RANK" in os.environ:
        sys.argv[1:] = json.loads(os.environ[LAUNCHED])


def die_with_launcher() -> None:
    """End this worker when torchrun's agent (its parent) dies, as on a SIGKILL of the stage.

    torchrun starts each worker in a session of its own, so killing the stage's
    process group would otherwise leave the workers training and writing into
    models/ with no `dvc repro` waiting for them. Linux only (prctl); elsewhere
    a no-op.
    """
    if not sys.platform.startswith("linux") or "LOCAL_RANK" not in os.environ:
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the agent died before the line above took effect
        os._exit(1)


def all_reduce_sum(values: list[float], device: str) -> list[float]:
    """Sum of each value over the processes (token counts, seconds); unchanged when alone."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device="cuda" if device == "cuda" else "cpu")
    dist.all_reduce(tensor)
    return tensor.tolist()
