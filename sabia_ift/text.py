"""Text normalisation shared by the format stage (cleaning) and evaluation (exact match)."""

from __future__ import annotations

import re
import unicodedata

_SPACES = re.compile(r"[^\S\n]")  # any whitespace except newline
_BLANK_RUNS = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    """NFC, Unix newlines, one kind of space, no trailing spaces, at most one blank line.

    Runs of spaces inside a line are kept: responses with code need their indentation.
    """
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _SPACES.sub(" ", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip()
