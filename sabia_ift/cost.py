"""What a stage run cost: wall time, CPU time (the process and its children) and, on CUDA, GPU time and energy.

stage.run records each stage into logs/cost/<stage>.json under the DVC project
(DVC_ROOT, else the current folder), beside logs/train-timings.json: outside git
and outside DVC's outputs, since the numbers differ on every run and say nothing
about the results. `sabia-ift report` shows them next to the results of each revision.

GPU time is wall time times the GPUs the stage used (what a rented machine
bills). Energy is the change of NVML's total-energy counter of those GPUs
(Volta and newer); where NVML or the counter is missing, it is null. The counter
is the card's, so other work on the same card in the meantime counts too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .io import write_json

log = logging.getLogger(__name__)

COST_DIR = Path("logs") / "cost"
_gpus_noted = 0


def note_gpus(count: int) -> None:
    """A stage whose GPUs work in other processes (DDP workers under torchrun) says how many it used."""
    global _gpus_noted
    _gpus_noted = max(_gpus_noted, count)


def cpu_seconds() -> float:
    """User and system CPU time of this process and of the children it has waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _visible(count: int) -> list[int]:
    """NVML indices of the GPUs CUDA numbers 0, 1, ... in this process (CUDA_VISIBLE_DEVICES)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return list(range(count))
    indices = []
    for part in listed.split(","):
        part = part.strip()
        if not part.isdigit():  # a UUID or MIG id: not mapped here, and nothing after it is visible
            break
        if int(part) < count:
            indices.append(int(part))
    return indices


def energy_counters(nvml: Any = None) -> list[int | None] | None:
    """NVML's total energy (millijoules) of each visible GPU, in CUDA's order; None without NVML.

    A GPU without the counter gives None in its place.
    """
    try:
        if nvml is None:
            import pynvml

            nvml = pynvml
        nvml.nvmlInit()
    except Exception:  # no library, no driver, no GPU: nothing to measure
        return None
    try:
        counters: list[int | None] = []
        for index in _visible(nvml.nvmlDeviceGetCount()):
            try:
                counters.append(int(nvml.nvmlDeviceGetTotalEnergyConsumption(nvml.nvmlDeviceGetHandleByIndex(index))))
            except Exception:  # NVMLError_NotSupported on cards before Volta
                counters.append(None)
        return counters
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()


def cuda_gpus() -> int:
    """GPUs this process used through torch (0 when it never touched CUDA), or those a stage noted."""
    torch = sys.modules.get("torch")
    used = 0
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        used = torch.cuda.device_count()
    return max(used, _gpus_noted)


def process_age() -> float:
    """Seconds since this process started (Linux /proc); 0 where that cannot be read."""
    try:
        # Fields after the command name, which may hold spaces: the 22nd field (start time) is the 20th here.
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


class Meter:
    """Measures a stage run from its process's start (imports included: they are part of what a
    run costs) to `record`. Energy is read from the meter's creation, the start of stage.run."""

    def __init__(self, energy: Callable[[], list[int | None] | None] = energy_counters) -> None:
        self._energy = energy
        age = process_age()
        self.started = time.time() - age
        self.wall0 = time.perf_counter() - age
        self.energy0 = energy()

    def record(self, gpus: int | None = None) -> dict[str, Any]:
        wall = time.perf_counter() - self.wall0
        cpu = cpu_seconds()
        gpus = cuda_gpus() if gpus is None else gpus
        energy_j = None
        if gpus and self.energy0 is not None:
            end = self._energy() or []
            deltas = [(b - a) / 1000 for a, b in zip(self.energy0[:gpus], end[:gpus])
                      if a is not None and b is not None]
            if len(deltas) == gpus:
                energy_j = round(sum(deltas), 1)
        return {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "gpus": gpus,
                "gpu_s": round(wall * gpus, 3) if gpus else None, "energy_j": energy_j,
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started))}


def stage_name() -> str:
    """The DVC stage being run (DVC_STAGE), else the stage script's name."""
    return os.environ.get("DVC_STAGE") or Path(sys.argv[0]).stem or "stage"


def cost_file(name: str | None = None) -> Path:
    return Path(os.environ.get("DVC_ROOT") or ".") / COST_DIR / f"{name or stage_name()}.json"


def write_cost(meter: Meter, name: str | None = None) -> Path | None:
    """Write the stage's cost record; a machine that refuses the write loses only the record."""
    path = cost_file(name)
    try:
        write_json(path, {"stage": name or stage_name(), **meter.record()})
    except Exception as exc:  # the stage's results are written; its cost log is not worth failing it
        log.warning("could not record the stage's cost in %s: %s", path, exc)
        return None
    return path


def read_costs(folder: str | Path) -> dict[str, dict[str, Any]]:
    """{stage: cost record} of a logs/cost folder; an unreadable record is left out with a warning."""
    costs = {}
    for path in sorted(Path(folder).glob("*.json")):
        try:
            costs[path.stem] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("%s: not a cost record (%s); left out", path, exc)
    return costs
