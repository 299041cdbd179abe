"""What every stage script shares: logging, params loading and clean failure."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable

from .cost import Meter, write_cost
from .determinism import check_pinned, pin_cpu_numerics
from .errors import SabiaError
from .io import REFUSED


def quiet_libraries() -> None:
    """Silence library notices about the libraries themselves, which nobody running the pipeline can act on.

    Called when this module is imported: stage scripts import it before anything
    that imports bitsandbytes, whose notice comes at import time.
    """
    # bitsandbytes, on CPUs with AVX512-BF16, warns that the optional `kernels`
    # package (a faster CPU 4-bit kernel from the Hub) is missing; the CPU path works without it.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # peft's get_peft_model reads a transformers attribute deprecated in transformers 5.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def quiet_bars() -> None:
    """Turn library progress bars off where stderr is not a terminal; the project's own progress lines stay.

    A bar redraws with \\r: in a log (`dvc repro` in CI) every redraw piles up into one unreadable
    line. Called when this module is imported, before the libraries that read these variables
    at import (tqdm reads TQDM_* into its defaults then; huggingface_hub its own flag).
    """
    if sys.stderr is not None and sys.stderr.isatty():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # loading weights, downloads
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # saving and mapping datasets
    # Any tqdm bar whose caller leaves `disable` unset (lm-eval's per-task request building);
    # callers that pass disable=False themselves are handled where they are called.
    os.environ.setdefault("TQDM_DISABLE", "1")


quiet_libraries()
quiet_bars()
# Before any stage imports torch: the same bytes on every x86-64 CPU (determinism.py says how).
pin_cpu_numerics()


def _elapsed(record: logging.LogRecord) -> bool:
    record.elapsed = record.relativeCreated / 1000
    return True


def setup_logging() -> None:
    # Each line says how far into the stage it came (seconds since the process started logging,
    # which stage scripts do first): where a stage's time goes reads off its log.
    handler = logging.StreamHandler()
    handler.addFilter(_elapsed)
    handler.setFormatter(logging.Formatter("%(elapsed)6.1fs %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    # The pipeline runs offline by default; a telemetry ping or Hub check would only time out.
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def run(main: Callable[[argparse.Namespace], None], doc: str | None, *paths: str,
        optional: tuple[str, ...] = (), argv: list[str] | None = None) -> int:
    """Parse `--params` and the stage's path arguments, run it, and turn a SabiaError
    into one line on stderr and exit code 2.

    Paths come from dvc.yaml's `cmd`, so dvc.yaml is the one place that names them. A run under
    DVC that succeeds records its cost (sabia_ift/cost.py) in logs/cost/<stage>.json.
    """
    meter = Meter()
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--params", default="params.yaml")
    for name in paths:
        parser.add_argument(f"--{name}", required=True)
    for name in optional:
        parser.add_argument(f"--{name}", default=None)
    setup_logging()
    args = parser.parse_args(argv)
    try:
        check_pinned()
        main(args)
    except SabiaError as exc:
        # One line, whatever a wrapped library put in the message.
        message = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
        print(f"error: {message}", file=sys.stderr)
        return 2
    except OSError as exc:
        # Atomic outputs report a refused write themselves (io.atomic_path); files written by
        # libraries (the Trainer's checkpoints, trackers' logs) get the same one line here.
        # A full or read-only disk or a missing permission is the machine's state, not a bug.
        if exc.errno not in REFUSED:
            raise
        where = f"{os.fsdecode(exc.filename)}: " if exc.filename is not None else ""
        print(f"error: {where}{exc.strerror}", file=sys.stderr)
        return 2
    # Only under DVC (DVC_STAGE set): a stage called by hand or from a test leaves no log in the
    # current folder. A DDP worker's time is its launcher's (the children's CPU time).
    if os.environ.get("DVC_STAGE") and "LOCAL_RANK" not in os.environ:
        write_cost(meter)
    return 0
