"""Checks a row of the bundled sample: parses its phrasing back and recomputes the answer.

Only the tests need it; the generator (sabia_ift/toy/sample.py) writes rows whose
every answer follows from the instruction and input, and this proves it.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping
from functools import cache

from sabia_ift.toy.sample import (
    _MONTHS,
    _NUMBER_PATTERN,
    _UF_BY_CAPITAL,
    _UF_BY_NAME,
    _UF_BY_OF_NAME,
    _WEEKDAYS,
    FAMILIES,
    KEYS,
    Family,
    Variant,
)


def _alternation(options: Iterable[str]) -> str:
    # Longest first so "Mato Grosso do Sul" is tried before "Mato Grosso".
    ordered = sorted(set(options), key=lambda s: (-len(s), s))
    return "(?:" + "|".join(re.escape(o) for o in ordered) + ")"


_WORD_PATTERN = r"[^\s“”]+"
FIELD_PATTERNS: dict[str, str] = {
    "a": _NUMBER_PATTERN,
    "b": _NUMBER_PATTERN,
    "n": _NUMBER_PATTERN,
    "c": _NUMBER_PATTERN,
    "extenso": r"[a-zçãéêíóôõú ]+",
    "dia": _alternation(_WEEKDAYS),
    "mes": _alternation(_MONTHS),
    "uf": _alternation(_UF_BY_NAME),
    "de_uf": _alternation(_UF_BY_OF_NAME),
    "sigla": r"[A-Z]{2}",
    "capital": _alternation(_UF_BY_CAPITAL),
    "singular": _WORD_PATTERN,
    "palavra": _WORD_PATTERN,
    "lista": r"[^,\n]+(?:, [^,\n]+)+",
    "frase": r"[^\n]+",
}


@cache
def _template_regex(template: str) -> re.Pattern[str]:
    pieces: list[str] = []
    seen: set[str] = set()
    for literal, name, _, _ in string.Formatter().parse(template):
        pieces.append(re.escape(literal))
        if name is None:
            continue
        if name in seen:
            pieces.append(f"(?P={name})")
        else:
            seen.add(name)
            pieces.append(f"(?P<{name}>{FIELD_PATTERNS[name]})")
    return re.compile("".join(pieces))


def parse(variant: Variant, row: Mapping[str, str]) -> dict[str, str] | None:
    """Field values if the row is this phrasing, else None."""
    m_instruction = _template_regex(variant.instruction).fullmatch(row["instruction"])
    if m_instruction is None:
        return None
    m_input = _template_regex(variant.input).fullmatch(row["input"])
    if m_input is None:
        return None
    return {**m_instruction.groupdict(), **m_input.groupdict()}


def _matches(row: Mapping[str, str]) -> list[tuple[Family, dict[str, str]]]:
    found: list[tuple[Family, dict[str, str]]] = []
    for family in FAMILIES:
        for variant in family.variants:
            values = parse(variant, row)
            if values is not None:
                found.append((family, values))
    return found


def family_of(row: Mapping[str, str]) -> str | None:
    """Name of the one task family whose phrasing the row uses, else None."""
    if not isinstance(row.get("instruction"), str) or not isinstance(row.get("input"), str):
        return None
    found = _matches(row)
    return found[0][0].name if len(found) == 1 else None


def check_row(row: Mapping[str, str]) -> bool:
    """Recompute the answer from instruction and input; True if ``output`` equals it.

    A row whose text fits no phrasing, or more than one, is not checkable and
    counts as wrong.
    """
    if set(row) != set(KEYS) or not all(isinstance(row[k], str) for k in KEYS):
        return False
    found = _matches(row)
    if len(found) != 1:
        return False
    family, values = found[0]
    try:
        expected = family.answer(values)
    except (KeyError, ValueError, IndexError):
        return False
    return row["output"] == expected
