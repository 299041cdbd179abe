"""Progress of long loops (training steps, evaluation prompts): counts, rate and ETA.

In a terminal a tqdm bar redraws in place. Under `dvc repro` or CI, stderr is
not a terminal and a redrawn bar becomes one `\\r`-joined line that nobody can
read, so there the same facts go out as plain lines, one every `every_s`
seconds or `every_percent` of the work, whichever comes first: a few dozen
lines for a whole run, however long.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def interactive(stream: TextIO | None = None) -> bool:
    """True when `stream` (stderr by default) is a terminal that can redraw a bar."""
    stream = stream if stream is not None else sys.stderr
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def clock(seconds: float) -> str:
    """0:42, 12:05, 3:07:09."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def status_line(label: str, done: int, total: int | None, elapsed: float, unit: str, initial: int = 0) -> str:
    """`train: step 120/400 (30%), 2.31 step/s, elapsed 0:52, ETA 2:01`.

    The rate counts only what was done in `elapsed` (a resumed run starts at `initial`).
    """
    rate = (done - initial) / elapsed if elapsed > 0 else 0.0
    # Slow loops read better as seconds per item than as 0.05 item/s.
    speed = f"{rate:.2f} {unit}/s" if rate >= 1 or rate == 0 else f"{1 / rate:.2f} s/{unit}"
    if total:
        eta = clock((total - done) / rate) if rate > 0 else "?"
        return (f"{label}: {unit} {done}/{total} ({100 * done / total:.0f}%), {speed}, "
                f"elapsed {clock(elapsed)}, ETA {eta}")
    return f"{label}: {unit} {done}, {speed}, elapsed {clock(elapsed)}"


class Progress:
    """Counts work done; a tqdm bar on a terminal, throttled plain lines elsewhere.

    `update(n)` adds n items; `close()` writes the final line. Usable as a
    context manager and as the `progress` callable of generation (it is called
    with the number of items just finished).
    """

    def __init__(self, total: int | None, label: str, *, unit: str = "item", stream: TextIO | None = None,
                 every_s: float = 30.0, every_percent: float = 10.0, bar: bool | None = None, initial: int = 0) -> None:
        self.total, self.label, self.unit, self.initial = total, label, unit, initial
        self.stream = stream if stream is not None else sys.stderr
        self.every_s, self.every_percent = every_s, every_percent
        self.done = initial
        self.start = time.monotonic()
        self._last_time = self.start
        self._last_done = initial
        self._closed = False
        self._bar = None
        if bar if bar is not None else interactive(self.stream):
            from tqdm.auto import tqdm

            # mininterval keeps even a terminal's redraws cheap on fast loops.
            self._bar = tqdm(total=total, desc=label, unit=unit, file=self.stream, mininterval=0.5,
                             initial=initial)

    def __call__(self, n: int = 1) -> None:
        self.update(n)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        due = now - self._last_time >= self.every_s
        if self.total and not due:
            step = self.total * self.every_percent / 100
            due = int(self.done / step) > int(self._last_done / step) if step > 0 else True
        if due and (not self.total or self.done < self.total):
            self._write(now)

    def _write(self, now: float) -> None:
        print(status_line(self.label, self.done, self.total, now - self.start, self.unit, self.initial),
              file=self.stream, flush=True)
        self._last_time, self._last_done = now, self.done

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        else:
            self._write(time.monotonic())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
