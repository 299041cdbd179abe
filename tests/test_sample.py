"""The bundled sample set: reproducible, checkable, and defective only where planned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sample_verifier import check_row, family_of, parse

from sabia_ift.toy import sample
from sabia_ift.toy.sample import (
    BLANK_INSTRUCTION_ROWS,
    DUPLICATE_SOURCES,
    EMPTY_OUTPUT_ROWS,
    FAMILIES,
    KEYS,
    N_ROWS,
    PLANTED_DEFECTS,
    generate_rows,
    is_planted_defect,
    number_to_words,
    words_to_number,
    write_sample,
)

COMMITTED = Path(__file__).resolve().parent.parent / "data" / "sample" / "instructions.jsonl"


@pytest.fixture(scope="module")
def rows() -> list[dict[str, str]]:
    return generate_rows(0)


def _row(instruction: str, output: str, input_text: str = "") -> dict[str, str]:
    return {"instruction": instruction, "input": input_text, "output": output}


def test_committed_file_is_the_generated_one(tmp_path: Path) -> None:
    fresh = tmp_path / "instructions.jsonl"
    write_sample(generate_rows(0), fresh)
    assert COMMITTED.read_bytes() == fresh.read_bytes(), (
        "data/sample/instructions.jsonl was edited by hand or is stale; regenerate it with "
        "`python -m sabia_ift.toy.sample data/sample/instructions.jsonl`"
    )


def test_cli_writes_the_same_bytes(tmp_path: Path, rows: list[dict[str, str]]) -> None:
    out = tmp_path / "sub" / "out.jsonl"
    assert sample.main([str(out)]) == 0
    reference = tmp_path / "reference.jsonl"
    write_sample(rows, reference)
    assert out.read_bytes() == reference.read_bytes()


def test_the_documented_command_regenerates_the_file(tmp_path: Path) -> None:
    """The docs once named `python -m sabia_ift.sample`, a module that does not exist."""
    import re
    import subprocess
    import sys

    repo = COMMITTED.parents[2]
    for doc in (repo / "data" / "sample" / "README.md", repo / "sabia_ift" / "toy" / "sample.py"):
        commands = set(re.findall(r"python -m (sabia_ift[\w.]*) data/sample/instructions\.jsonl", doc.read_text()))
        assert commands == {"sabia_ift.toy.sample"}, f"{doc} documents {commands}"
    out = tmp_path / "instructions.jsonl"
    done = subprocess.run([sys.executable, "-m", "sabia_ift.toy.sample", str(out)], cwd=repo,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == COMMITTED.read_bytes()


def test_file_format(tmp_path: Path, rows: list[dict[str, str]]) -> None:
    path = tmp_path / "x.jsonl"
    write_sample(rows, path)
    data = path.read_bytes()
    assert data.endswith(b"\n") and b"\r" not in data
    lines = data.decode("utf-8").split("\n")[:-1]
    assert len(lines) == len(rows)
    # ensure_ascii=False: accents are written as themselves, not \\u escapes.
    assert "\\u" not in data.decode("utf-8")
    for line, row in zip(lines, rows):
        obj = json.loads(line)
        assert list(obj) == list(KEYS)
        assert obj == row


def test_same_seed_same_rows_other_seed_other_rows(rows: list[dict[str, str]]) -> None:
    assert generate_rows(0) == rows
    other = generate_rows(1)
    assert len(other) == len(rows)
    assert other != rows


def test_size_and_input_share(rows: list[dict[str, str]]) -> None:
    assert len(rows) == N_ROWS >= 1000
    share = sum(1 for r in rows if r["input"]) / len(rows)
    assert 0.3 <= share <= 0.6


def test_rows_are_short_strings_with_exact_keys(rows: list[dict[str, str]]) -> None:
    for row in rows:
        assert list(row) == list(KEYS)
        assert all(isinstance(row[k], str) for k in KEYS)
        assert len(row["instruction"]) + len(row["input"]) + len(row["output"]) < 400


def test_every_clean_row_is_right(rows: list[dict[str, str]]) -> None:
    wrong = [i for i, r in enumerate(rows) if not is_planted_defect(i) and not check_row(r)]
    assert wrong == []


@pytest.mark.parametrize("seed", [1, 7])
def test_other_seeds_are_right_too(seed: int) -> None:
    rows = generate_rows(seed)
    assert all(check_row(r) for i, r in enumerate(rows) if not is_planted_defect(i))


def test_checker_rejects_swapped_answers(rows: list[dict[str, str]]) -> None:
    clean = [r for i, r in enumerate(rows) if not is_planted_defect(i)]
    # Each row with its neighbour's answer: plausible-looking but wrong.
    for row, neighbour in zip(clean, clean[1:]):
        if row["output"] != neighbour["output"]:
            assert not check_row({**row, "output": neighbour["output"]}), row


@pytest.mark.parametrize(
    "row",
    [
        _row("Quanto é 2 mais 2?", "A soma de 2 e 2 é 5."),
        _row("Escreva o número 342 por extenso.", "Por extenso, 342 se escreve trezentos e quarenta e três."),
        _row("Qual é a capital da Bahia?", "A capital da Bahia é Recife."),
        _row("Qual é o plural de “pão”?", "O plural de “pão” é “pãos”."),
        _row("O número 7 é par ou ímpar?", "O número 7 é par, pois é divisível por 2."),
        _row("Converta 100 °C para graus Fahrenheit.", "A temperatura de 100 °C equivale a 211 °F."),
        _row("Que dia da semana vem depois de sábado?", "Depois de sábado vem segunda-feira."),
        # Right words, but the number is not canonically written.
        _row("Qual é o sucessor de 1999?", "O sucessor de 1999 é 2000."),
        # Nobody asks this: no phrasing fits, so it cannot be checked.
        _row("Qual é a cor do céu?", "O céu é azul."),
    ],
)
def test_checker_rejects_wrong_answers(row: dict[str, str]) -> None:
    assert not check_row(row)


@pytest.mark.parametrize(
    "row",
    [
        # Answers worked out by hand, independent of the generator's code.
        _row("Quanto é 697 mais 777?", "A soma de 697 e 777 é 1.474."),
        _row("Resolva a divisão abaixo.", "O resultado de 84 dividido por 7 é 12.", "84 ÷ 7"),
        _row("Escreva o número 1.999 por extenso.", "Por extenso, 1.999 se escreve mil novecentos e noventa e nove."),
        _row("Escreva em algarismos o número dois mil e quinze.",
             "Em algarismos, “dois mil e quinze” se escreve 2.015."),
        _row("Qual é a capital da Bahia?", "A capital da Bahia é Salvador."),
        _row("Escreva a sigla da unidade federativa abaixo.", "SC é a sigla de Santa Catarina.", "Santa Catarina"),
        _row("Qual é o plural de “pão”?", "O plural de “pão” é “pães”."),
        _row("Como fica “papel” no plural?", "O plural de “papel” é “papéis”."),
        _row("Converta 100 °C para graus Fahrenheit.", "A temperatura de 100 °C equivale a 212 °F."),
        _row("Converta -40 °C para graus Fahrenheit.", "A temperatura de -40 °C equivale a -40 °F."),
        _row("Que dia da semana vem depois de sábado?", "Depois de sábado vem domingo."),
        _row("Se hoje é domingo, que dia foi ontem?", "Antes de domingo vem sábado."),
        _row("Qual é o mês anterior a janeiro?", "O mês anterior a janeiro é dezembro."),
        _row("Conte as letras da palavra “maçã”.", "A palavra “maçã” tem 4 letras."),
        _row(
            "Coloque as palavras abaixo em ordem alfabética.",
            "Em ordem alfabética, as palavras ficam: arroz, árvore, avião, óculos, uva.",
            "uva, árvore, óculos, avião, arroz",
        ),
        _row(
            "Inverta a ordem das palavras da frase abaixo.",
            "Com as palavras em ordem inversa, a frase fica: feira na violão o comprou médica A.",
            "A médica comprou o violão na feira",
        ),
    ],
)
def test_checker_accepts_hand_computed_answers(row: dict[str, str]) -> None:
    assert check_row(row)


def test_only_planted_defects_are_duplicates_or_empty(rows: list[dict[str, str]]) -> None:
    first_seen: dict[tuple[str, str, str], int] = {}
    duplicates: dict[int, int] = {}
    for i, row in enumerate(rows):
        key = (row["instruction"], row["input"], row["output"])
        if key in first_seen:
            duplicates[i] = first_seen[key]
        else:
            first_seen[key] = i
    assert duplicates == DUPLICATE_SOURCES

    assert [i for i, r in enumerate(rows) if r["output"] == ""] == list(EMPTY_OUTPUT_ROWS)
    assert [i for i, r in enumerate(rows) if not r["output"].strip()] == list(EMPTY_OUTPUT_ROWS)
    assert [i for i, r in enumerate(rows) if not r["instruction"].strip()] == list(BLANK_INSTRUCTION_ROWS)
    # Whitespace, not empty, so a filter that only tests `== ""` misses it.
    assert rows[BLANK_INSTRUCTION_ROWS[0]]["instruction"] != ""

    # No two clean rows ask the same question, not even with different answers.
    prompts = [(r["instruction"], r["input"]) for i, r in enumerate(rows) if not is_planted_defect(i)]
    assert len(prompts) == len(set(prompts))


def test_planted_defect_helpers(rows: list[dict[str, str]]) -> None:
    assert len(PLANTED_DEFECTS) == 7
    assert sorted(PLANTED_DEFECTS.values()).count("duplicate") == 4
    for i, row in enumerate(rows):
        assert is_planted_defect(i) == (i in PLANTED_DEFECTS)
        if PLANTED_DEFECTS.get(i) in ("empty_output", "blank_instruction"):
            assert is_planted_defect(row)
            assert not check_row(row)
        elif i not in PLANTED_DEFECTS:
            assert not is_planted_defect(row)


def test_families_are_many_and_all_phrasings_are_used(rows: list[dict[str, str]]) -> None:
    assert len(FAMILIES) >= 10
    assert len({f.name for f in FAMILIES}) == len(FAMILIES)
    for family in FAMILIES:
        assert 2 <= len(family.variants) <= 5, family.name
    names = [family_of(r) for i, r in enumerate(rows) if not is_planted_defect(i)]
    assert None not in names
    assert set(names) == {f.name for f in FAMILIES}
    used = {
        (f.name, v)
        for r in rows
        for f in FAMILIES
        for v in f.variants
        if parse(v, r) is not None
    }
    assert used == {(f.name, v) for f in FAMILIES for v in f.variants}


def test_text_is_accented_portuguese(rows: list[dict[str, str]]) -> None:
    text = "".join(r["instruction"] + r["input"] + r["output"] for r in rows)
    for ch in "áéíóúâêôãõçà":
        assert ch in text, ch


@pytest.mark.parametrize(
    ("n", "words"),
    [
        (0, "zero"),
        (1, "um"),
        (10, "dez"),
        (16, "dezesseis"),
        (19, "dezenove"),
        (20, "vinte"),
        (21, "vinte e um"),
        (100, "cem"),
        (101, "cento e um"),
        (110, "cento e dez"),
        (200, "duzentos"),
        (342, "trezentos e quarenta e dois"),
        (555, "quinhentos e cinquenta e cinco"),
        (999, "novecentos e noventa e nove"),
        (1000, "mil"),
        (1001, "mil e um"),
        (1100, "mil e cem"),
        (1101, "mil cento e um"),
        (1300, "mil e trezentos"),
        (1999, "mil novecentos e noventa e nove"),
        (2015, "dois mil e quinze"),
        (3200, "três mil e duzentos"),
        (7070, "sete mil e setenta"),
        (9999, "nove mil novecentos e noventa e nove"),
    ],
)
def test_number_to_words(n: int, words: str) -> None:
    assert number_to_words(n) == words
    assert words_to_number(words) == n


def test_number_to_words_is_one_to_one_and_bounded() -> None:
    spelled = {number_to_words(i) for i in range(10000)}
    assert len(spelled) == 10000
    assert not any(s.startswith("um mil") for s in spelled)
    for bad in (-1, 10000):
        with pytest.raises(ValueError):
            number_to_words(bad)


def test_cli_make_sample_regenerates_the_committed_file(tmp_path):
    from sabia_ift.cli import main

    assert main(["make-sample", str(tmp_path / "s.jsonl")]) == 0
    assert (tmp_path / "s.jsonl").read_bytes() == COMMITTED.read_bytes()
