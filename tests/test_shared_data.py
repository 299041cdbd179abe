"""Real Portuguese data through fetch, format and tokenize.

FaQuAD (SQuAD-format reading comprehension) becomes a JSONL file with columns
pergunta/contexto/resposta, and ASSIN2 (entailment pairs) a CSV whose input
spans two lines; both are read through the local-file source with a
`fetch.columns` mapping. The data stays in ../shared/pt-eval: the converted
files are written to a temporary folder only. Skipped when that folder is absent.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import unicodedata
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import SHARED, make_project, params_for, project_env, write_params
from sabia_ift.artifacts import HF_SPLITS, SPLITS
from sabia_ift.data.tokenization import tokenize
from sabia_ift.io import read_jsonl
from sabia_ift.modeling import model_context_length
from sabia_ift.template import IGNORE_INDEX, encode_prompt
from sabia_ift.text import normalize_text

PT_EVAL = SHARED / "pt-eval"
MAX_LENGTH = 512
ACCENTS = set("áàâãéêíóôõúçÁÀÂÃÉÊÍÓÔÕÚÇ")


def faquad(folder: Path) -> tuple[Path, list[dict], dict]:
    """FaQuAD train as JSONL: question -> pergunta, context -> contexto, first answer -> resposta."""
    data = json.loads((PT_EVAL / "faquad_train.json").read_text(encoding="utf-8"))["data"]
    rows = [{"id": qa["id"], "pergunta": qa["question"], "contexto": para["context"],
             "resposta": qa["answers"][0]["text"]}
            for article in data for para in article["paragraphs"] for qa in para["qas"]]
    path = folder / "faquad.jsonl"
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    source = [{"instruction": r["pergunta"], "input": r["contexto"], "output": r["resposta"]} for r in rows]
    return path, source, {"instruction": "pergunta", "input": "contexto", "output": "resposta"}


def assin2(folder: Path) -> tuple[Path, list[dict], dict]:
    """ASSIN2 dev pairs as CSV: a fixed task, the two sentences on two lines, sim/não."""
    task = "A hipótese decorre da premissa? Responda sim ou não."
    source = []
    for pair in ET.parse(PT_EVAL / "assin2-dev.xml").getroot().iter("pair"):
        source.append({"instruction": task,
                       "input": f"Premissa: {pair.findtext('t')}\nHipótese: {pair.findtext('h')}",
                       "output": "sim" if pair.get("entailment") == "Entailment" else "não"})
    path = folder / "assin2.csv"
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["tarefa", "par", "rotulo", "similaridade"])
        for row, pair in zip(source, ET.parse(PT_EVAL / "assin2-dev.xml").getroot().iter("pair")):
            writer.writerow([row["instruction"], row["input"], row["output"], pair.get("similarity")])
    return path, source, {"instruction": "tarefa", "input": "par", "output": "rotulo"}


DATASETS = {"faquad-jsonl": faquad, "assin2-csv": assin2}


def stage(project: Path, *args: str) -> None:
    done = subprocess.run([sys.executable, "-m", *args], cwd=project, env=project_env(project),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module", params=list(DATASETS))
def pipeline(request, tmp_path_factory, tokenizer, tiny_base):
    """fetch and format through the stage scripts, tokenize (drop and truncate) with the tiny base's tokenizer."""
    if not PT_EVAL.is_dir():
        pytest.skip(f"{PT_EVAL} is absent")
    tmp = tmp_path_factory.mktemp(request.param)
    path, source, columns = DATASETS[request.param](tmp)
    project = make_project(tmp / "project", git=False)
    write_params(project, {"fetch": {"path": str(path), "columns": columns},
                           "format": {"val_size": 50, "test_size": 0.1, "seed": 0}})
    stage(project, "stages.fetch", "--out", "data/raw")
    stage(project, "stages.format", "--raw", "data/raw", "--out", "data/formatted",
          "--metrics", "metrics/format.json")
    formatted = project / "data" / "formatted"
    tokenized = {}
    for mode in ("drop", "truncate"):
        # Long FaQuAD contexts: many rows are dropped on purpose here, to test that path.
        cfg = params_for("tokenize", max_length=MAX_LENGTH, overlength=mode, max_drop_share=1.0)
        metrics = tokenize(cfg, tokenizer, model_context_length(tiny_base), formatted, tmp / f"tok-{mode}")
        tokenized[mode] = (tmp / f"tok-{mode}", metrics)
    return {"name": request.param, "project": project, "source": source, "formatted": formatted,
            "tokenized": tokenized}


def test_fetch_keeps_every_row_with_its_source_row(pipeline):
    project, source = pipeline["project"], pipeline["source"]
    manifest = json.loads((project / "data/raw/manifest.json").read_text())
    assert manifest["rows_in_source"] == manifest["rows_written"] == len(source) > 400
    raw = read_jsonl(project / "data/raw/rows.jsonl")
    assert [r["source_row"] for r in raw] == list(range(1, len(source) + 1))
    # The mapping picked the right columns, the text byte for byte as in the source.
    for row in raw:
        want = source[row["source_row"] - 1]
        assert {k: row[k] for k in ("instruction", "input", "output")} == want


def test_format_counts_add_up(pipeline):
    project, formatted = pipeline["project"], pipeline["formatted"]
    counts = json.loads((project / "metrics/format.json").read_text())
    dropped = read_jsonl(formatted / "dropped.jsonl")
    n_dropped = counts["dropped_empty_instruction"] + counts["dropped_empty_output"] + counts["dropped_duplicate"]
    assert counts["rows_in"] == len(pipeline["source"]) == counts["rows_out"] + n_dropped
    assert len(dropped) == n_dropped
    splits = {s: [r["source_row"] for r in read_jsonl(formatted / f"{s}.jsonl")] for s in SPLITS}
    assert [len(splits[s]) for s in SPLITS] == [counts[f"{s}_rows"] for s in SPLITS]
    assert counts["val_rows"] == 50 and counts["test_rows"] == round(0.1 * counts["rows_out"])
    kept = [row for s in SPLITS for row in splits[s]]
    assert len(kept) == len(set(kept)) == counts["rows_out"]
    assert set(kept) | {d["source_row"] for d in dropped} == set(range(1, counts["rows_in"] + 1))
    for entry in dropped:
        if entry["reason"] == "duplicate":
            a, b = pipeline["source"][entry["source_row"] - 1], pipeline["source"][entry["duplicate_of"] - 1]
            assert {k: normalize_text(v) for k, v in a.items()} == {k: normalize_text(v) for k, v in b.items()}


def test_portuguese_text_survives_formatting(pipeline):
    rows = [r for s in SPLITS for r in read_jsonl(pipeline["formatted"] / f"{s}.jsonl")]
    accented = 0
    for row in rows:
        want = pipeline["source"][row["source_row"] - 1]
        assert row["response"] == normalize_text(want["output"])
        assert row["instruction"] == normalize_text(want["instruction"])
        assert row["input"] == normalize_text(want["input"])
        assert unicodedata.is_normalized("NFC", row["prompt"] + row["response"])
        accented += bool(ACCENTS & set(row["input"] + row["response"]))
    assert accented > len(rows) // 4  # real Portuguese, accents and all


def test_tokenize_counts_add_up(pipeline):
    drop = pipeline["tokenized"]["drop"][1]
    trunc = pipeline["tokenized"]["truncate"][1]
    counts = json.loads((pipeline["project"] / "metrics/format.json").read_text())
    for split in SPLITS:
        d, t = drop[split], trunc[split]
        assert d["rows_in"] == t["rows_in"] == counts[f"{split}_rows"]
        for m in (d, t):
            assert m["rows_in"] == m["rows"] + m["dropped_too_long"] + m["dropped_prompt_too_long"]
            assert m["length"]["max"] <= MAX_LENGTH
        assert d["truncated"] == 0 and t["dropped_too_long"] == 0
        # A row too long to keep whole is truncated instead of dropped, unless its prompt alone is too long.
        assert t["truncated"] == d["dropped_too_long"]
        assert t["dropped_prompt_too_long"] == d["dropped_prompt_too_long"]
        assert t["rows"] == d["rows"] + d["dropped_too_long"]
    if pipeline["name"] == "faquad-jsonl":
        # FaQuAD contexts are long: at 512 tokens some rows do not fit, so both paths ran.
        assert sum(trunc[s]["truncated"] for s in SPLITS) > 0
        assert sum(drop[s]["dropped_too_long"] for s in SPLITS) > 0


@pytest.mark.parametrize("mode", ["drop", "truncate"])
def test_labels_and_round_trip(pipeline, tokenizer, mode):
    """Walk each split's rows and examples together: every example is its row's prompt + response."""
    import datasets

    folder, metrics = pipeline["tokenized"][mode]
    data = datasets.load_from_disk(str(folder))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for split in SPLITS:
        rows = read_jsonl(pipeline["formatted"] / f"{split}.jsonl")
        examples = data[HF_SPLITS[split]]
        j, whole, truncated, skipped = 0, 0, 0, 0
        for row in rows:
            prompt = encode_prompt(tokenizer, row["prompt"])
            ex = examples[j] if j < len(examples) else None
            if ex is None or ex["input_ids"][: len(prompt)] != prompt:
                skipped += 1  # dropped as too long: prompt + response + EOS did not fit
                assert len(prompt) + len(tokenizer(row["response"], add_special_tokens=False)["input_ids"]) \
                    >= MAX_LENGTH - 1
                continue
            ids, labels = ex["input_ids"], ex["labels"]
            j += 1
            assert ids[0] == bos and ex["length"] == len(ids) == len(labels) <= MAX_LENGTH
            assert all(label == IGNORE_INDEX for label in labels[: len(prompt)])  # BOS and prompt masked
            assert labels[len(prompt):] == ids[len(prompt):]                     # response trained
            if ids[-1] == eos:
                whole += 1
                assert ids.count(eos) == 1 and labels[-1] == eos                 # the real EOS is trained
                assert tokenizer.decode(ids[len(prompt):-1]) == row["response"]  # accents round-trip
            else:
                truncated += 1
                assert mode == "truncate" and len(ids) == MAX_LENGTH
                text = tokenizer.decode(ids[len(prompt):]).rstrip("\ufffd")
                assert text and row["response"].startswith(text)
        assert j == len(examples), f"{split}: examples left over that match no row"
        m = metrics[split]
        assert (whole + truncated, truncated, skipped) == (
            m["rows"], m["truncated"], m["dropped_too_long"] + m["dropped_prompt_too_long"])
        assert m["trained_tokens"] == sum(sum(1 for t in lab if t != IGNORE_INDEX) for lab in examples["labels"])
