"""Benchmark task files are read as the fetch stage reads its file (sabia_ift/datafiles.py):
the same files accepted, the same one-line errors naming the file, the row and the key."""

from __future__ import annotations

import gzip
import json

import pytest

from conftest import default_params
from sabia_ift.config import parse_section
from sabia_ift.errors import DataError
from sabia_ift.evaluation import benchmark_data

GOOD = {"q": "Quanto é 2 + 2?", "opts": ["3", "4"], "ans": "B"}


def load(path, kind="multiple_choice", **columns):
    """The task's rows, from a task of `kind` reading `path`."""
    task = {"name": "prova", "kind": kind, "path": str(path), "num_fewshot": 0}
    if kind == "multiple_choice":
        task["columns"] = {"question": "q", "answer": "ans", **(columns or {"choices": "opts"})}
    cfg = parse_section("benchmark", {**default_params()["benchmark"], "tasks": [task]})
    return benchmark_data.load_task_data(cfg.tasks[0], 0)


def test_a_task_file_that_is_not_utf8_names_its_line(tmp_path):
    path = tmp_path / "prova.jsonl"
    bad = b'{"q": "Qu\xe9 \xe9 2 + 2?", "opts": ["3", "4"], "ans": "B"}\n'
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + bad)
    at = bad.index(b"\xe9")
    with pytest.raises(DataError) as err:
        load(path)
    assert str(err.value) == f"{path}: line 2: invalid UTF-8 at byte {at} of the line"


@pytest.mark.parametrize(("name", "kind", "message"), [
    ("prova.jsonl", "multiple_choice", "line 2: JSON nested too deeply to read"),
    ("prova.json", "multiple_choice", "row 2: JSON nested too deeply to read"),
    ("enem.json", "enem", "JSON nested too deeply to read"),
])
def test_json_nested_200000_deep_is_one_line(tmp_path, name, kind, message):
    deep = "[" * 200_000 + "]" * 200_000
    path = tmp_path / name
    path.write_text(json.dumps(GOOD) + "\n" + deep + "\n" if name.endswith(".jsonl")
                    else f"[{json.dumps(GOOD)}, {deep}]")
    with pytest.raises(DataError) as err:
        load(path, kind)
    assert str(err.value) == f"{path}: {message}"


def test_a_csv_cell_over_131072_characters_is_read(tmp_path):
    question = "Leia o texto a seguir com atenção. " * 6000
    path = tmp_path / "prova.csv"
    path.write_text(f'q,A,B,ans\n"{question}",3,4,B\nQuanto é 1 + 1?,2,3,A\n', encoding="utf-8")
    rows = load(path, choice_columns=["A", "B"]).test
    assert len(question) > 131_072
    assert rows[0]["question"] == " ".join(question.split()) and rows[1]["answer"] == "A"


@pytest.mark.parametrize("name", ["prova.jsonl.gz", "prova.csv.gz", "prova.json.gz"])
def test_gzipped_task_files_are_read(tmp_path, name):
    if ".csv" in name:
        text = "\ufeffq,A,B,ans\nQuanto é 2 + 2?,3,4,B\n"  # with Excel's BOM
        columns = {"choice_columns": ["A", "B"]}
    else:
        text = json.dumps(GOOD) + "\n" if ".jsonl" in name else json.dumps([GOOD])
        columns = {}
    path = tmp_path / name
    path.write_bytes(gzip.compress(text.encode("utf-8")))
    assert load(path, **columns).test == [{"id": "1", "question": "Quanto é 2 + 2?", "choices": ["3", "4"],
                                           "answer": "B"}]


def test_a_utf16_task_file_is_named_for_what_it_is(tmp_path):
    path = tmp_path / "prova.json"
    path.write_bytes(json.dumps([GOOD], ensure_ascii=False).encode("utf-16"))
    with pytest.raises(DataError) as err:
        load(path)
    assert str(err.value) == f"{path}: file is UTF-16 (little-endian), not UTF-8; save it as UTF-8"


def pair(**attrs) -> str:
    values = {"entailment": "Entailment", "id": "1", "similarity": "4.5", **attrs}
    attributes = " ".join(f'{k}="{v}"' for k, v in values.items())
    return f"<pair {attributes}><t>O gato {values['id']} dorme.</t><h>Um gato dorme.</h></pair>"


@pytest.mark.parametrize(("xml", "message"), [
    (f"<corpus>{pair()}{pair(id='dois')}</corpus>", "row 2: key id: expected a whole number, got 'dois'"),
    (f"<corpus>{pair(similarity='alta')}</corpus>", "row 1: key similarity: expected a number, got 'alta'"),
    (f"<corpus>{pair()}<pair", "not valid XML: unclosed token: line 1, column"),
])
def test_assin2_xml_errors_are_one_line_naming_row_and_key(tmp_path, xml, message):
    path = tmp_path / "assin2.xml"
    path.write_text(xml, encoding="utf-8")
    with pytest.raises(DataError) as err:
        load(path, "assin2_sts")
    assert str(err.value).startswith(f"{path}: {message}")
    assert "\n" not in str(err.value)


def test_a_gzipped_assin2_xml_is_read(tmp_path):
    path = tmp_path / "assin2.xml.gz"
    path.write_bytes(gzip.compress(f"<corpus>{pair()}{pair(id='2', entailment='None')}</corpus>".encode()))
    rows = load(path, "assin2_rte").test
    assert [(r["id"], r["label"]) for r in rows] == [(1, "Sim"), (2, "Não")]


def test_the_stage_says_it_in_one_line(tmp_path, capsys):
    """Through the stage script: exit code 2 and one line, before any model is loaded."""
    import yaml

    from sabia_ift import stage
    from stages.benchmark import main

    bad = tmp_path / "prova.jsonl"
    bad.write_bytes(b'{"q": "Qu\xe9?", "opts": ["3", "4"], "ans": "B"}\n')
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"benchmark": {**default_params()["benchmark"], "tasks": [
        {"name": "prova", "kind": "multiple_choice", "path": str(bad), "num_fewshot": 0,
         "columns": {"question": "q", "choices": "opts", "answer": "ans"}}]}}))
    code = stage.run(main, None, "base", "adapter", "base_results", "metrics", argv=[
        "--params", str(params), "--base", str(tmp_path / "no-base"), "--adapter", str(tmp_path / "no-adapter"),
        "--base_results", str(tmp_path / "no-base-results.json"), "--metrics", str(tmp_path / "benchmarks.json")])
    assert code == 2 and not (tmp_path / "benchmarks.json").exists()
    assert capsys.readouterr().err == f"error: {bad}: line 1: invalid UTF-8 at byte 9 of the line\n"
