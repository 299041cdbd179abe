"""The embedded default's benchmark sets: a small exam and a classification set.

Written for this project (Apache-2.0, like the instruction sample) from the
same fact tables as sabia_ift/toy/sample.py, so every answer is checkable:
`check_exam_row` and `check_parity_row` recompute it. They exercise the
benchmark stage's generic tasks (multiple choice and classification) on the
tiny model without any download. Regenerate the committed files with::

    python -m sabia_ift.toy.benchmark_sets data/sample/benchmark
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path

from .sample import _PLURAL_OF, _PLURALS, _UF_BY_NAME, _UFS, format_int

EXAM_FILE = "exame.jsonl"
PARITY_FILE = "paridade.jsonl"
EXAM_ROWS = 60
PARITY_ROWS = 60
LETTERS = "ABCDE"
PARITY_LABELS = ("par", "ímpar")


def _options(rng: random.Random, right: str, pool: Sequence[str]) -> tuple[list[str], str]:
    wrong = rng.sample([p for p in pool if p != right], 4)
    choices = [right, *wrong]
    rng.shuffle(choices)
    return choices, LETTERS[choices.index(right)]


def _exam_row(rng: random.Random, kind: str) -> dict:
    if kind == "capital":
        uf = rng.choice(_UFS)
        question = f"Qual é a capital {uf.of_name}?"
        choices, answer = _options(rng, uf.capital, sorted({u.capital for u in _UFS}))
    elif kind == "sigla":
        uf = rng.choice(_UFS)
        question = f"Qual é a sigla {uf.of_name}?"
        choices, answer = _options(rng, uf.code, [u.code for u in _UFS])
    elif kind == "plural":
        word, plural = rng.choice(_PLURALS)
        question = f"Qual é o plural de “{word}”?"
        choices, answer = _options(rng, plural, [p for _, p in _PLURALS])
    else:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        question = f"Quanto é {a} + {b}?"
        near = sorted({a + b + d for d in range(-12, 13)} - {a + b})
        choices, answer = _options(rng, format_int(a + b), [format_int(n) for n in near])
    return {"pergunta": question, "alternativas": choices, "resposta": answer}


def exam_rows(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    kinds = ("capital", "sigla", "plural", "soma")
    rows = [_exam_row(rng, kinds[i % len(kinds)]) for i in range(EXAM_ROWS)]
    return [{"id": f"exame-{i + 1}", **row} for i, row in enumerate(rows)]


def parity_rows(seed: int = 0) -> list[dict]:
    rng = random.Random(seed + 1)
    rows = []
    for i in range(PARITY_ROWS):
        n = rng.randint(0, 9999)
        rows.append({"id": f"paridade-{i + 1}", "texto": f"O número sorteado foi {format_int(n)}.",
                     "classe": PARITY_LABELS[n % 2]})
    return rows


def check_exam_row(row: dict) -> bool:
    question, right = row["pergunta"], row["alternativas"][LETTERS.index(row["resposta"])]
    if question.startswith("Quanto é "):
        a, b = question.removeprefix("Quanto é ").rstrip("?").split(" + ")
        return right == format_int(int(a) + int(b))
    if question.startswith("Qual é o plural de “"):
        return _PLURAL_OF[question.removeprefix("Qual é o plural de “").rstrip("”?")] == right
    ufs = [uf for uf in _UF_BY_NAME.values() if question.endswith(f" {uf.of_name}?")]
    if len(ufs) != 1:
        return False
    return right == (ufs[0].capital if question.startswith("Qual é a capital") else ufs[0].code)


def check_parity_row(row: dict) -> bool:
    n = int(row["texto"].removeprefix("O número sorteado foi ").rstrip(".").replace(".", ""))
    return row["classe"] == PARITY_LABELS[n % 2]


def write(folder: str | Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in ((EXAM_FILE, exam_rows()), (PARITY_FILE, parity_rows())):
        with (folder / name).open("w", encoding="utf-8", newline="\n") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    write(parser.parse_args(argv).folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
