"""Terminal chat, for machines without a browser: answers stream to stdout as they are generated.

At a terminal, the prompts have line editing and a history kept across
sessions (readline), and Ctrl-C while an answer streams stops that answer
only.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from .chat import Chat, Settings

HISTORY_LINES = 1000


def history_file() -> Path:
    """Where the terminal chat keeps its input history: the user's cache folder, never the project."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "sabia-ift" / "chat_history"


def line_editing(path: Path) -> Callable[[], None]:
    """Turn on readline for input() with the history in `path`; returns what saves it."""
    import readline

    readline.set_history_length(HISTORY_LINES)
    # An unreadable or unwritable history is no reason to refuse a chat.
    if path.is_file():
        with contextlib.suppress(OSError):
            readline.read_history_file(str(path))

    def save() -> None:
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(str(path))

    return save


def answer_to(out: TextIO, chat: Chat, instruction: str, input: str, settings: Settings,
              which: list[str]) -> None:
    """Stream each asked model's answer, then one line with its stop reason and token count."""
    for side in which:
        if len(which) > 1:
            print(f"[{side}]", file=out, flush=True)
        stream = chat.stream(instruction, input, settings, side)  # type: ignore[arg-type]
        for piece in stream:  # Ctrl-C here stops this answer only (Chat.stream)
            out.write(piece)
            out.flush()
        assert stream.answer is not None
        print(f"\n[{side}: {stream.answer.describe()}]", file=out, flush=True)


def repl(chat: Chat, settings: Settings, which: list[str], *, ask_input: bool,
         read: Callable[[str], str] | None = None, out: TextIO = sys.stdout) -> None:
    """Ask for instructions until an empty line or end of input."""
    save = lambda: None  # noqa: E731
    if read is None:
        read = input
        if sys.stdin.isatty():
            save = line_editing(history_file())
    print("Empty line or Ctrl-D to quit; Ctrl-C stops an answer.", file=out)
    try:
        while True:
            try:
                instruction = read("Instrução> ").strip()
                if not instruction:
                    return
                extra = read("Entrada (Enter: none)> ").strip() if ask_input else ""
            except (EOFError, KeyboardInterrupt):
                print(file=out)
                return
            answer_to(out, chat, instruction, extra, settings, which)
    finally:
        save()
