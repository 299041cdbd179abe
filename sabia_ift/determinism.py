"""The same bytes on every x86-64 CPU: the pipeline's CPU numerics pinned before torch loads.

A float sum depends on the order of its terms, and three things choose that order
on a CPU: the vector width torch's own kernels were dispatched for (AVX2, AVX-512:
`torch.backends.cpu.get_cpu_capability()`), the code branch Intel MKL picks for
its matrix products, and how many threads split a product or a reduction. Left
to themselves all three follow the machine, so a fresh clone on another CPU built
a different tiny base, and every metric after it moved. Each is pinned here:

- torch's kernels run their portable build (`ATEN_CPU_CAPABILITY=default`);
- MKL takes its compatible branch in strict mode (`MKL_CBWR=COMPATIBLE,STRICT`),
  whose results do not depend on the CPU, the memory alignment or the threads;
- oneDNN is capped at SSE4.1 (`DNNL_MAX_CPU_ISA`), for any op that reaches it;
- two threads, whatever the machine has (`OMP_NUM_THREADS`, `MKL_NUM_THREADS`):
  the thread count splits reductions, so it is part of the result.

These are read once, when torch (and MKL, and OpenMP) load, so `pin_cpu_numerics`
must run before anything imports torch: `sabia_ift.stage` calls it on import, and
every stage script imports that module first. CUDA kernels are not affected; on a
GPU run the pins touch only the little CPU arithmetic around it. What it costs on
CPU is measured in BENCHMARKS.md.

`SABIA_IFT_CPU_NUMERICS=native` leaves the machine's choices alone (faster on CPU;
results then differ from one CPU to another, and `dvc.lock` with them).
"""

from __future__ import annotations

import os
import sys

THREADS = 2
PINNED_ENV = {
    "ATEN_CPU_CAPABILITY": "default",
    "MKL_CBWR": "COMPATIBLE,STRICT",
    "DNNL_MAX_CPU_ISA": "SSE41",
    "OMP_NUM_THREADS": str(THREADS),
    "MKL_NUM_THREADS": str(THREADS),
}
SWITCH = "SABIA_IFT_CPU_NUMERICS"
# Intel MKL's vector math (which torch's elementwise kernels call for sqrt and the like) gives
# other bits on Intel than on AMD CPUs, its compatible branch too; AdamW's fused CPU kernel does
# its arithmetic in torch's own code, which the pins cover. Same update rule, same defaults.
CPU_OPTIMIZERS = {"adamw_torch": "adamw_torch_fused"}


def wanted() -> bool:
    return os.environ.get(SWITCH, "pinned") != "native"


def pin_cpu_numerics() -> bool:
    """Set the pins in this process's environment (and so its children's: torchrun, DataLoader workers).

    A shell's own values are overridden: results must not depend on what a user exported.
    Returns False where torch is already loaded (a notebook, a test process that imported it
    first): there it is too late, and the process keeps the machine's numerics.
    """
    if not wanted() or "torch" in sys.modules:
        return False
    os.environ.update(PINNED_ENV)
    return True


def check_pinned() -> None:
    """Fail a stage whose torch loaded before the pins: its numbers would only look reproducible."""
    if not wanted() or "torch" not in sys.modules:
        return
    import torch

    if torch.backends.cpu.get_cpu_capability() != "DEFAULT" or torch.get_num_threads() != THREADS:
        raise RuntimeError("torch was imported before sabia_ift.determinism.pin_cpu_numerics(); "
                           "import sabia_ift.stage first in a stage script")


def optimizer_name(name: str, device: str) -> str:
    """The Trainer's `optim` for `train.optim` on this device: on CPU, one whose bits the pins decide."""
    return CPU_OPTIMIZERS.get(name, name) if device == "cpu" and wanted() else name


def describe() -> dict[str, str | int]:
    """What the running process actually uses, for the stage records (torch must be imported)."""
    import torch

    return {
        "cpu_numerics": "pinned" if wanted() else "native",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }
