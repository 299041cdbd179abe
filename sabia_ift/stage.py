"""What every stage script shares: logging, params loading and clean failure."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable

from .errors import SabiaError


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


quiet_libraries()


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # The pipeline runs offline by default; a telemetry ping or Hub check would only time out.
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # Library bars (loading weights, saving datasets) redraw with \r: in a log that is not a
    # terminal they pile up into unreadable lines. The project's own progress lines stay.
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def run(main: Callable[[argparse.Namespace], None], doc: str | None, *paths: str,
        optional: tuple[str, ...] = (), argv: list[str] | None = None) -> int:
    """Parse `--params` and the stage's path arguments, run it, and turn a SabiaError
    into one line on stderr and exit code 2.

    Paths come from dvc.yaml's `cmd`, so dvc.yaml is the one place that names them.
    """
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--params", default="params.yaml")
    for name in paths:
        parser.add_argument(f"--{name}", required=True)
    for name in optional:
        parser.add_argument(f"--{name}", default=None)
    setup_logging()
    args = parser.parse_args(argv)
    try:
        main(args)
    except SabiaError as exc:
        # One line, whatever a wrapped library put in the message.
        message = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0
