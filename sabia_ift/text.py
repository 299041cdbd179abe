"""Text normalisation shared by the format stage (cleaning) and evaluation (exact match)."""

from __future__ import annotations

import re
import unicodedata

_SPACES = re.compile(r"[^\S\n]")  # any whitespace except newline
_BLANK_RUNS = re.compile(r"\n{3,}")
# Characters that show nothing and mean nothing in prose: zero-width space,
# word joiner, BOM/zero-width no-break space, soft hyphen, Mongolian vowel
# separator, and C0/C1 control characters (NUL, BEL, ESC, DEL, ...) other than
# tab, newline, vertical tab and form feed. They would be trained on, and a
# trailing zero-width space would make a duplicate look new. Joiners (U+200C,
# U+200D) stay: emoji sequences and some scripts need them. Vertical tab and
# form feed separate words like a tab does, so they become a space with the
# other spacing characters ("Resposta\x0bcom" must not read "Respostacom").
_INVISIBLE = re.compile("[\u200b\u2060\ufeff\u00ad\u180e\x00-\x08\x0e-\x1f\x7f-\x9f]")


def has_invisible(text: str) -> bool:
    """Whether normalize_text would remove invisible or control characters from `text`."""
    return _INVISIBLE.search(text.replace("\r", "")) is not None


def normalize_text(text: str) -> str:
    """NFC, Unix newlines, no invisible or control characters, one kind of space,
    no trailing spaces, at most one blank line.

    Runs of spaces inside a line are kept: responses with code need their indentation.
    Text made only of format characters (joiners, direction marks) counts as empty.
    """
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _INVISIBLE.sub("", text)
    text = _SPACES.sub(" ", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = _BLANK_RUNS.sub("\n\n", text)
    text = text.strip()
    if all(unicodedata.category(char) == "Cf" or char.isspace() for char in text):
        return ""
    return text


def comparable(text: str) -> str:
    """`text` as duplicate checks compare it: NFKC, case-folded, no invisible characters,
    whitespace runs as one space.

    NFKC folds compatibility forms (ligatures, full-width letters, non-breaking
    spaces) that show the same words; case, spacing and a zero-width space do not
    make an item new.
    """
    return " ".join(_INVISIBLE.sub("", unicodedata.normalize("NFKC", text)).casefold().split())
