"""Run a Python module or script with CUDA memory capped, as on a smaller card.

    python bench/memory_cap.py GIB -m stages.train --params ...
    python bench/memory_cap.py GIB bench/peers.py --tool unsloth ...

The cap is torch's per-process memory fraction of card 0, set before the program
imports anything else, so every allocation of this project's stage and of a peer
meets the same limit (the CUDA context itself, ~0.5 GiB, is outside it, as it is
outside what a card's spec sheet lists).
"""

from __future__ import annotations

import os
import runpy
import sys


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    gib, rest = float(sys.argv[1]), sys.argv[2:]
    sys.path.insert(0, os.getcwd())  # as `python -m` would have it
    if rest[0] == "-m" and rest[1].startswith("stages."):
        import sabia_ift.stage  # noqa: F401  (a stage pins CPU numerics before torch loads)
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total), 0)
    if rest[0] == "-m":
        sys.argv = [rest[1], *rest[2:]]
        runpy.run_module(rest[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = rest
        runpy.run_path(rest[0], run_name="__main__")


if __name__ == "__main__":
    main()
