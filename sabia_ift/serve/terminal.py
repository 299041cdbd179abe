"""Terminal chat, for machines without a browser: answers stream to stdout as they are generated."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

from .chat import Chat, Settings


def answer_to(out: TextIO, chat: Chat, instruction: str, input: str, settings: Settings,
              which: list[str]) -> None:
    """Stream each asked model's answer, then one line with its stop reason and token count."""
    for side in which:
        if len(which) > 1:
            print(f"[{side}]", file=out, flush=True)
        stream = chat.stream(instruction, input, settings, side)  # type: ignore[arg-type]
        for piece in stream:
            out.write(piece)
            out.flush()
        assert stream.answer is not None
        print(f"\n[{side}: {stream.answer.describe()}]", file=out, flush=True)


def repl(chat: Chat, settings: Settings, which: list[str], *, ask_input: bool,
         read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> None:
    """Ask for instructions until an empty line or end of input."""
    print("Empty line or Ctrl-D to quit.", file=out)
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
