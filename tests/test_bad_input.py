"""Bad input fails cleanly: one `error:` line naming the file, row and key, exit code 2, no output.

Each case runs a real stage script (`python -m stages.<name>`) in a fresh copy of
the project. The fetch, format and base stages import no ML library before they
fail, so a subprocess per case is cheap. The tokenize, train and evaluate cases
that need the tiny base model run the same scripts in this process (runpy, as
`__main__`), so torch and transformers load once.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import runpy
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from conftest import REPO, default_params, make_project, params_for, project_env, write_params

SHA = "0123456789abcdef0123456789abcdef01234567"

COMMANDS = {
    "fetch": ["-m", "stages.fetch", "--out", "data/raw"],
    "format": ["-m", "stages.format", "--raw", "data/raw", "--out", "data/formatted",
               "--metrics", "metrics/format.json"],
    "base": ["-m", "stages.base", "--out", "models/base"],
    "train": ["-m", "stages.train", "--base", "models/base", "--data", "data/tokenized",
              "--out", "models/adapter", "--checkpoints", "models/checkpoints",
              "--live", "metrics/curves", "--metrics", "metrics/train.json", "--timings", "logs/train-timings.json"],
    # Its task data is checked before any model is loaded.
    "benchmark": ["-m", "stages.benchmark", "--base", "models/base", "--adapter", "models/adapter",
                  "--base_results", "data/benchmark/base.json", "--metrics", "metrics/benchmarks.json"],
}
# What each stage writes (dvc.yaml outs and metrics): none of it may exist after a failure.
OUTPUTS = {
    "fetch": ["data/raw"],
    "format": ["data/formatted", "metrics/format.json"],
    "base": ["models/base"],
    "tokenize": ["data/tokenized", "metrics/tokenize.json", "metrics/detail/tokenize.json"],
    "train": ["models/adapter", "models/checkpoints", "metrics/curves", "metrics/train.json",
              "logs/train-timings.json"],
    "evaluate": ["data/eval/samples.jsonl", "metrics/eval_prompts.jsonl", "metrics/eval.json"],
    "benchmark": ["metrics/benchmarks.json"],
}


def jsonl(*rows) -> bytes:
    """JSON Lines; a bytes item is written as the raw line."""
    return b"".join(r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode() + b"\n"
                    for r in rows)


def ok(i: int) -> dict:
    return {"instruction": f"Pergunta número {i}?", "input": "", "output": f"Resposta {i}."}


def parquet(columns: dict[str, list]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table(columns), path)

    return write


@dataclass
class Case:
    id: str
    stage: str
    expect: list[str]                      # words the one error line must hold
    files: dict[str, bytes | Callable[[Path], None]] = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    before: list[str] = field(default_factory=list)  # stages that must succeed first
    args: list[str] = field(default_factory=list)    # extra stage arguments


def data(name: str, content, **fetch) -> dict:
    """files= and params= for a fetch case reading data/<name>."""
    return {"files": {f"data/{name}": content}, "params": {"fetch": {"path": f"data/{name}", **fetch}}}


FIVE_ROWS = data("in.jsonl", jsonl(*(ok(i) for i in range(1, 6))))


def exam_task(**task) -> dict:
    """files= and params= for a benchmark task reading a 3-question exam (and a 1-question few-shot pool)."""
    questions = [{"pergunta": f"Quanto é {i} + {i}?", "alternativas": [str(2 * i), "0"], "resposta": "A"}
                 for i in range(1, 5)]
    return {"files": {"data/prova.jsonl": jsonl(*questions[:3]), "data/exemplos.jsonl": jsonl(questions[3])},
            "params": {"benchmark": {"tasks": [{
                "name": "prova", "kind": "multiple_choice", "path": "data/prova.jsonl",
                "columns": {"question": "pergunta", "choices": "alternativas", "answer": "resposta"}, **task}]}}}


def params_without(section: str, key: str) -> dict:
    """files= for a params.yaml that lacks one key (write_params can only add or change)."""
    params = default_params()
    del params[section][key]
    return {"params.yaml": yaml.safe_dump(params, sort_keys=False, allow_unicode=True).encode()}

CASES = [
    # --- fetch: JSON Lines ---------------------------------------------------
    Case("jsonl-missing-output", "fetch", ["data/in.jsonl", "line 2", "'output'", "fetch.columns.output"],
         **data("in.jsonl", jsonl(ok(1), {"instruction": "Sem resposta", "input": ""}))),
    Case("jsonl-instruction-number", "fetch", ["data/in.jsonl", "line 3", "'instruction'", "string", "a number (42)"],
         **data("in.jsonl", jsonl(ok(1), ok(2), {"instruction": 42, "input": "", "output": "x"}))),
    Case("jsonl-instruction-list", "fetch", ["data/in.jsonl", "line 1", "'instruction'", "a list"],
         **data("in.jsonl", jsonl({"instruction": ["a", "b"], "input": "", "output": "x"}))),
    Case("jsonl-instruction-null", "fetch", ["data/in.jsonl", "line 2", "'instruction'", "got null"],
         **data("in.jsonl", jsonl(ok(1), {"instruction": None, "input": "", "output": "x"}))),
    Case("jsonl-input-number", "fetch", ["data/in.jsonl", "line 1", "'input'", "a number (7)"],
         **data("in.jsonl", jsonl({"instruction": "a", "input": 7, "output": "x"}))),
    Case("jsonl-output-object", "fetch", ["data/in.jsonl", "line 2", "'output'", "an object"],
         **data("in.jsonl", jsonl(ok(1), {"instruction": "a", "input": "", "output": {"text": "x"}}))),
    Case("jsonl-invalid-utf8", "fetch", ["data/in.jsonl", "line 2", "invalid UTF-8"],
         **data("in.jsonl", jsonl(ok(1), b'{"instruction": "a\xe7\xff", "input": "", "output": "x"}\n', ok(3)))),
    Case("jsonl-lone-surrogate-escape", "fetch", ["data/in.jsonl", "line 1", "'output'", "not valid UTF-8"],
         **data("in.jsonl", b'{"instruction": "a", "input": "", "output": "x\\ud800y"}\n')),
    Case("jsonl-truncated-last-line", "fetch", ["data/in.jsonl", "line 3", "not valid JSON", "truncated"],
         **data("in.jsonl", jsonl(ok(1), ok(2), b'{"instruction": "Qual'))),
    Case("jsonl-bad-json-line", "fetch", ["data/in.jsonl", "line 2", "not valid JSON"],
         **data("in.jsonl", jsonl(ok(1), b"{instruction: sem aspas}\n", ok(3)))),
    Case("jsonl-row-not-an-object", "fetch", ["data/in.jsonl", "line 2", "expected an object", "list"],
         **data("in.jsonl", jsonl(ok(1), ["a", "", "b"]))),
    Case("jsonl-error-after-blank-lines", "fetch", ["data/in.jsonl", "line 4", "'output'"],
         **data("in.jsonl", jsonl(ok(1)) + b"\n\n" + jsonl({"instruction": "a", "input": ""}))),
    Case("jsonl-deeply-nested", "fetch", ["data/in.jsonl", "line 2", "nested too deeply"],
         **data("in.jsonl", jsonl(ok(1)) + b"[" * 100_000 + b"\n")),
    Case("jsonl-empty-file", "fetch", ["data/in.jsonl", "no rows"], **data("in.jsonl", b"")),
    Case("jsonl-blank-lines-only", "fetch", ["data/in.jsonl", "no rows"], **data("in.jsonl", b"\n  \n\n")),
    Case("jsonl-input-column-typo", "fetch", ["data/in.jsonl", "fetch.columns.input", "'entrada'", "no row has"],
         **data("in.jsonl", jsonl(ok(1), ok(2)), columns={"input": "entrada"})),
    # --- fetch: JSON -----------------------------------------------------------
    Case("json-not-a-list", "fetch", ["data/in.json", "expected a JSON list", "dict"],
         **data("in.json", json.dumps({"rows": [ok(1)]}).encode())),
    Case("json-deeply-nested", "fetch", ["data/in.json", "nested too deeply"],
         **data("in.json", b'{"rows": ' + b"[" * 100_000)),
    Case("json-empty-file", "fetch", ["data/in.json", "no rows"], **data("in.json", b"")),
    Case("json-empty-list", "fetch", ["data/in.json", "no rows"], **data("in.json", b"[]\n")),
    Case("json-syntax-error", "fetch", ["data/in.json", "not valid JSON", "line 2"],
         **data("in.json", b'[{"instruction": "a", "input": "", "output": "b"},\n {"instruction": }]\n')),
    Case("json-instruction-column-typo", "fetch",
         ["data/in.json", "row 1", "'instrucao'", "fetch.columns.instruction"],
         **data("in.json", json.dumps([ok(1), ok(2)]).encode(), columns={"instruction": "instrucao"})),
    Case("json-input-column-typo", "fetch", ["data/in.json", "fetch.columns.input", "'contexto'"],
         **data("in.json", json.dumps([ok(1), ok(2)]).encode(), columns={"input": "contexto"})),
    Case("json-invalid-utf8", "fetch", ["data/in.json", "row 2", "'output'", "not valid UTF-8"],
         **data("in.json", b'[{"instruction": "a", "input": "", "output": "b"},\n'
                           b' {"instruction": "c", "input": "", "output": "d\xff"}]\n')),
    # --- fetch: CSV --------------------------------------------------------------
    Case("csv-without-mapped-column", "fetch", ["data/in.csv", "fetch.columns.output", "'output'", "'resposta'"],
         **data("in.csv", b"instruction,input,resposta\na,,b\n")),
    Case("csv-mapping-names-absent-column", "fetch", ["data/in.csv", "fetch.columns.output", "'resposta'"],
         **data("in.csv", b"instruction,input,output\na,,b\n", columns={"output": "resposta"})),
    Case("csv-too-many-fields", "fetch", ["data/in.csv", "row 2", "more fields"],
         **data("in.csv", b"instruction,input,output\na,,b\nc,d,e,f\n")),
    Case("csv-too-few-fields", "fetch", ["data/in.csv", "row 3", "fewer fields"],
         **data("in.csv", b"instruction,input,output\na,,b\nc,,d\ne,f\n")),
    Case("csv-unclosed-quote", "fetch", ["data/in.csv", "row 2", "CSV error"],
         **data("in.csv", b'instruction,input,output\na,,b\n"c,,d\n')),
    Case("csv-invalid-utf8", "fetch", ["data/in.csv", "row 3", "'input'", "not valid UTF-8"],
         **data("in.csv", b"instruction,input,output\na,,b\nc,,d\ne,f\xe3o,g\n")),
    Case("csv-empty-file", "fetch", ["data/in.csv", "no rows"], **data("in.csv", b"")),
    Case("csv-header-only", "fetch", ["data/in.csv", "no rows"], **data("in.csv", b"instruction,input,output\n")),
    Case("csv-repeated-mapped-column", "fetch", ["data/in.csv", "repeats column 'output'"],
         **data("in.csv", b"instruction,input,output,output\na,,b,c\n")),
    # --- fetch: parquet -----------------------------------------------------------
    Case("parquet-missing-column", "fetch", ["data/in.parquet", "fetch.columns.output", "'output'"],
         **data("in.parquet", parquet({"instruction": ["a", "b"], "input": ["", ""]}))),
    Case("parquet-output-not-string", "fetch", ["data/in.parquet", "row 1", "'output'", "a number (1)"],
         **data("in.parquet", parquet({"instruction": ["a", "b"], "input": ["", ""], "output": [1, 2]}))),
    Case("parquet-garbage", "fetch", ["data/in.parquet", "not a readable parquet file"],
         **data("in.parquet", b"PAR1 this is not parquet")),
    # --- fetch: compression ------------------------------------------------------------
    Case("gzip-without-gz-suffix", "fetch", ["data/in.jsonl", "gzip-compressed", "in.jsonl.gz"],
         **data("in.jsonl", gzip.compress(jsonl(ok(1), ok(2)), mtime=0))),
    Case("zip-named-csv", "fetch", ["data/in.csv", "zip-compressed", "decompress"],
         **data("in.csv", b"PK\x03\x04" + b"\x00" * 40)),
    Case("gzip-damaged", "fetch", ["data/in.jsonl.gz", "not a valid gzip file"],
         **data("in.jsonl.gz", gzip.compress(jsonl(*(ok(i) for i in range(50))), mtime=0)[:40])),
    Case("gzip-parquet", "fetch", ["fetch.path", "data/in.parquet.gz", "parquet compresses its own data"],
         **data("in.parquet.gz", gzip.compress(b"PAR1", mtime=0))),
    # --- fetch: encodings other than UTF-8 ------------------------------------------------
    Case("json-utf16", "fetch", ["data/in.json", "UTF-16 (little-endian)", "save it as UTF-8"],
         **data("in.json", json.dumps([ok(1), ok(2)], ensure_ascii=False).encode("utf-16"))),
    Case("csv-utf16-without-bom", "fetch", ["data/in.csv", "UTF-16 (big-endian)", "save it as UTF-8"],
         **data("in.csv", "instruction,input,output\nOlá,,Oi\n".encode("utf-16-be"))),
    # --- fetch: paths and format ------------------------------------------------------
    Case("data-path-missing", "fetch", ["data/nope.jsonl", "no such data file", "fetch.path"],
         params={"fetch": {"path": "data/nope.jsonl"}}),
    Case("data-path-is-a-folder", "fetch", ["data/sample", "is a folder", "fetch.path"],
         params={"fetch": {"path": "data/sample"}}),
    Case("data-path-dev-null", "fetch", ["/dev/null", "not a regular file", "fetch.path"],
         params={"fetch": {"path": "/dev/null"}}),
    Case("data-path-empty", "fetch", ["params.yaml", "fetch.path", "at least 1 character"],
         params={"fetch": {"path": ""}}),
    Case("data-path-removed", "fetch", ["params.yaml", "fetch.path", "Field required"],
         files=params_without("fetch", "path")),
    Case("unknown-suffix", "fetch", ["fetch.file_format", "data/in.txt"], **data("in.txt", jsonl(ok(1)))),
    Case("output-folder-is-a-file", "fetch", ["data/in.jsonl/raw", "cannot be written", "data/in.jsonl is a file"],
         args=["--out", "data/in.jsonl/raw"], **data("in.jsonl", jsonl(ok(1)))),
    # --- params.yaml -------------------------------------------------------------------
    Case("params-unknown-nested-key", "fetch", ["params.yaml", "fetch.columns.resposta: unknown key"],
         params={"fetch": {"columns": {"resposta": "output"}}}),
    Case("params-unknown-key", "fetch", ["params.yaml", "fetch.colunas: unknown key"],
         params={"fetch": {"colunas": {}}}),
    Case("params-unknown-section", "fetch", ["params.yaml", "unknown section", "fetchh"],
         params={"fetchh": {"path": "x"}}),
    Case("params-column-mapped-twice", "fetch", ["params.yaml", "fetch.columns.instruction", "fetch.columns.output",
                                                 "'texto'"],
         params={"fetch": {"columns": {"instruction": "texto", "input": None, "output": "texto"}}}),
    Case("params-bad-enum", "fetch", ["params.yaml", "fetch.file_format", "xlsx"],
         params={"fetch": {"file_format": "xlsx"}}),
    Case("params-zero-max-rows", "fetch", ["params.yaml", "fetch.max_rows"], params={"fetch": {"max_rows": 0}}),
    Case("params-file-missing", "fetch", ["nope.yaml", "no such params file"], args=["--params", "nope.yaml"]),
    Case("params-not-yaml", "fetch", ["params.yaml", "not valid YAML", "line 2, column 9"],
         files={"params.yaml": b"fetch:\n  path: [unclosed\n"}),
    Case("params-not-a-mapping", "fetch", ["params.yaml", "mapping"], files={"params.yaml": b"- fetch\n- format\n"}),
    Case("params-lr-negative", "train", ["params.yaml", "train.lr", "greater than 0", "-0.001"],
         params={"train": {"lr": -1e-3}}),
    Case("params-lr-zero", "train", ["params.yaml", "train.lr"], params={"train": {"lr": 0}}),
    Case("params-batch-size-zero", "train", ["params.yaml", "train.micro_batch_size"],
         params={"train": {"micro_batch_size": 0}}),
    Case("params-epochs-negative", "train", ["params.yaml", "train.epochs"], params={"train": {"epochs": -1}}),
    Case("params-lora-r-zero", "train", ["params.yaml", "train.lora.r"], params={"train": {"lora": {"r": 0}}}),
    Case("params-lora-targets-empty", "train", ["params.yaml", "train.lora.target_modules"],
         params={"train": {"lora": {"target_modules": []}}}),
    Case("params-lr-infinite", "train", ["params.yaml", "train.lr", "finite number", "inf"],
         files={"params.yaml": (REPO / "params.yaml").read_bytes().replace(b"  lr: 0.002", b"  lr: .inf")}),
    Case("params-warmup-infinite", "train", ["params.yaml", "train.warmup", "finite number"],
         params={"train": {"warmup": float("inf")}}),
    Case("params-epochs-infinite", "train", ["params.yaml", "train.epochs", "finite number"],
         params={"train": {"epochs": float("inf")}}),
    Case("params-dropout-nan", "train", ["params.yaml", "train.lora.dropout", "finite number"],
         params={"train": {"lora": {"dropout": float("nan")}}}),
    Case("params-max-steps-zero", "train", ["params.yaml", "train.max_steps", "-1", "positive", "got 0"],
         params={"train": {"max_steps": 0}}),
    # --- train on several processes: refused before torchrun starts them ---------------------
    Case("devices-cannot-split-grad-accum", "train", ["train.grad_accum", "3 processes", "train.devices"],
         params={"train": {"device": "cpu", "devices": 3, "grad_accum": 1}}),
    Case("devices-before-base", "train", ["models/base", "no such base model folder"],
         params={"train": {"device": "cpu", "devices": 2, "grad_accum": 2}}),
    Case("devices-fp16-on-cpu", "train", ["train.precision", "fp16", "CUDA"],
         params={"train": {"device": "cpu", "devices": 2, "grad_accum": 2, "precision": "fp16"}}),
    Case("params-boolean-as-count", "fetch", ["params.yaml", "fetch.max_rows", "not a boolean"],
         params={"fetch": {"max_rows": True}}),
    Case("params-test-size-one-float", "format", ["params.yaml", "format.test_size", "strictly between 0 and 1",
                                                  "got 1.0", "write 1"],
         params={"format": {"test_size": 1.0}}),
    Case("params-val-size-true", "format", ["params.yaml", "format.val_size", "not a boolean"],
         params={"format": {"val_size": True}}),
    Case("params-test-size-negative", "format", ["params.yaml", "format.test_size", "row count", "got -5"],
         params={"format": {"test_size": -5}}),
    Case("params-test-size-text", "format", ["params.yaml", "format.test_size", "got '10%'"],
         params={"format": {"test_size": "10%"}}),
    # --- format ------------------------------------------------------------------------
    Case("test-split-larger-than-data", "format", ["format.test_size alone asks for 10", "only 5 rows"],
         before=["fetch"], params={**FIVE_ROWS["params"], "format": {"test_size": 10, "val_size": 0}},
         files=FIVE_ROWS["files"]),
    Case("val-plus-test-leave-no-train", "format",
         ["format.val_size (2)", "format.test_size (3)", "no training rows", "5 rows"],
         before=["fetch"], params={**FIVE_ROWS["params"], "format": {"test_size": 3, "val_size": 2}},
         files=FIVE_ROWS["files"]),
    Case("split-shares-leave-no-train", "format", ["format.val_size", "format.test_size", "no training rows"],
         before=["fetch"], params={**FIVE_ROWS["params"], "format": {"test_size": 0.6, "val_size": 0.4}},
         files=FIVE_ROWS["files"]),
    Case("every-row-empty", "format", ["data/raw/rows.jsonl", "no usable rows", "empty_instruction",
                                       "empty_output"],
         before=["fetch"], **data("in.jsonl", jsonl({"instruction": " ", "input": "", "output": "x"},
                                                   {"instruction": "a", "input": "b", "output": "\n\t"},
                                                   {"instruction": "", "input": "", "output": ""}))),
    Case("format-before-fetch", "format", ["data/raw/rows.jsonl", "no such file"]),
    Case("format-raw-damaged", "format", ["data/raw/rows.jsonl", "row 2", "not valid JSON"],
         files={"data/raw/rows.jsonl": jsonl({**ok(1), "source_row": 1}, b'{"instruction": "a", "inp\n')}),
    Case("format-unknown-key", "format", ["params.yaml", "format.seeds: unknown key"],
         before=["fetch"], params={"format": {"seeds": 1}}),
    # --- base ----------------------------------------------------------------------------
    Case("model-folder-missing", "base", ["base.name_or_path", "/nonexistent/sabia", "neither an existing folder"],
         params={"base": {"source": "pretrained", "name_or_path": "/nonexistent/sabia"}}),
    Case("hub-unreachable-empty-cache", "base", ["org/absent", SHA, "HF_HUB_OFFLINE"],
         params={"base": {"source": "pretrained", "name_or_path": "org/absent", "revision": SHA}}),
    Case("model-folder-without-weights", "base", ["base.name_or_path", "no *.safetensors weights", "model.bin"],
         params={"base": {"source": "pretrained", "name_or_path": "weights"}},
         files={"weights/config.json": b"{}", "weights/model.bin": b"pickle"}),
    # --- benchmark -------------------------------------------------------------------------
    Case("benchmark-fewshot-more-than-rows", "benchmark",
         ["benchmark.tasks.0.num_fewshot", "task prova", "asks for 3", "its 3 rows"],
         **exam_task(num_fewshot=3)),
    Case("benchmark-fewshot-more-than-pool", "benchmark",
         ["benchmark.tasks.0.num_fewshot", "task prova", "asks for 3", "data/exemplos.jsonl", "has 1 row"],
         **exam_task(num_fewshot=3, fewshot_path="data/exemplos.jsonl")),
]


# --- The documented messages (docs/bad-input.md) ----------------------------------------

DOC = REPO / "docs" / "bad-input.md"
# Regenerate the doc from what the stages really say: SABIA_UPDATE_DOCS=1 pytest tests/test_bad_input.py
UPDATE_DOC = os.environ.get("SABIA_UPDATE_DOCS") == "1"
# Cases run by the in-process tests below, documented beside the table's.
IN_PROCESS = ["max-length-above-model-context", "tokenize-before-format", "tokenize-drops-too-many-rows",
              "lora-target-the-model-lacks", "cuda-without-a-gpu", "train-loss-not-finite",
              "data-file-unreadable", "fetch-into-read-only-folder", "no-train-meta", "corrupt-train-meta",
              "garbage-adapter-config", "report-to-not-installed", "generate-empty-instruction",
              "generate-invisible-instruction", "generate-zero-new-tokens"]
SEEN: dict[str, tuple[str, str]] = {}


def table() -> dict[str, tuple[str, str]]:
    """Case id -> (stage, message), from the doc's table rows: | `id` | stage | `message` |."""
    found = {}
    for line in DOC.read_text(encoding="utf-8").partition("<!-- table -->")[2].splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            found[cells[0].strip("`")] = (cells[1], cells[2].strip("`").replace("\\|", "|"))
    return found


def documented() -> dict[str, str]:
    """Case id -> message, as the doc shows it."""
    return {cid: message for cid, (_, message) in table().items()}


def record(case_id: str, stage_name: str, line: str) -> None:
    """The error line a case gave must be the one the doc shows (or, when updating, becomes it)."""
    SEEN[case_id] = (stage_name, line)
    if not UPDATE_DOC:
        assert documented().get(case_id) == line, (
            f"docs/bad-input.md is out of date for {case_id}; rerun with SABIA_UPDATE_DOCS=1")


@pytest.fixture(scope="module", autouse=True)
def _write_doc():
    yield
    if UPDATE_DOC and SEEN:
        rows = {**documented(), **{cid: line for cid, (_, line) in SEEN.items()}}
        stages = ({cid: st for cid, (st, _) in table().items()} | {c.id: c.stage for c in CASES}
                  | {cid: st for cid, (st, _) in SEEN.items()})
        head, _, _ = DOC.read_text(encoding="utf-8").partition("<!-- table -->")
        order = [c.id for c in CASES] + IN_PROCESS
        lines = ["| case | stage | message |", "|---|---|---|"]
        for cid in order:
            if cid in rows:
                lines.append(f"| `{cid}` | {stages.get(cid, '')} | `{rows[cid].replace('|', chr(92) + '|')}` |")
        DOC.write_text(head + "<!-- table -->\n\n" + "\n".join(lines) + "\n", encoding="utf-8")


def test_doc_lists_every_case():
    listed = documented()
    missing = [cid for cid in [c.id for c in CASES] + IN_PROCESS if cid not in listed]
    assert not missing, f"docs/bad-input.md lacks {missing}"


def leftovers(project: Path) -> list[str]:
    """Temporaries that atomic writes leave only when something went wrong."""
    return [str(p.relative_to(project)) for pattern in (".*.tmp-*", ".*.old-*") for p in project.rglob(pattern)]


def setup(case: Case, tmp_path: Path) -> Path:
    project = make_project(tmp_path / "project", git=False)
    if case.params:
        write_params(project, case.params)
    for rel, content in case.files.items():
        path = project / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        content(path) if callable(content) else path.write_bytes(content)
    return project


def stage(project: Path, name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *COMMANDS[name], *args], cwd=project, env=project_env(project),
                          capture_output=True, text=True, timeout=120)


def error_line(stderr: str) -> str:
    """The one `error:` line; anything else (a traceback, a second error) fails the test."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    assert stderr.rstrip("\n").endswith(errors[0]), stderr  # the last thing said
    return errors[0]


def test_enough_cases():
    assert len(CASES) >= 25
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_fails_cleanly(case: Case, tmp_path):
    project = setup(case, tmp_path)
    for name in case.before:
        done = stage(project, name)
        assert done.returncode == 0, done.stderr
    result = stage(project, case.stage, *case.args)
    assert result.returncode == 2, result.stderr
    line = error_line(result.stderr)
    for word in case.expect:
        assert word in line, f"{word!r} not in {line!r}"
    record(case.id, case.stage, line)
    for out in OUTPUTS[case.stage]:
        assert not (project / out).exists(), f"{out} exists after a failed {case.stage}"
    assert leftovers(project) == []


# --- Stages that need the tiny base, run in this process ---------------------------------


def run_script(module: str, argv: list[str], project: Path, monkeypatch, capsys) -> str:
    """Run `python -m <module> <argv>` here, in `project`; return its one error line (exit must be 2)."""
    monkeypatch.chdir(project)
    monkeypatch.setattr(sys, "argv", [module, *argv])
    for var in ("DVC_NO_ANALYTICS", "HF_HUB_DISABLE_TELEMETRY"):  # set by the stage; restored after
        monkeypatch.setenv(var, "1")
    sys.modules.pop(module, None)
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module(module, run_name="__main__")
    stderr = capsys.readouterr().err
    assert exit_.value.code == 2, stderr
    return error_line(stderr)


@pytest.fixture
def project_with_base(tmp_path, tiny_base):
    """A project copy whose models/base is the tiny base (as the base stage writes it)."""
    project = make_project(tmp_path / "project", git=False)
    shutil.copytree(tiny_base, project / "models" / "base")
    return project


def check_clean(project: Path, stage_name: str) -> None:
    for out in OUTPUTS[stage_name]:
        assert not (project / out).exists(), f"{out} exists after a failed {stage_name}"
    assert leftovers(project) == []


TOKENIZE_ARGS = ["--base", "models/base", "--formatted", "data/formatted", "--out", "data/tokenized",
                 "--metrics", "metrics/tokenize.json", "--detail", "metrics/detail/tokenize.json"]
EVALUATE_ARGS = ["--base", "models/base", "--adapter", "models/adapter", "--formatted", "data/formatted",
                 "--tokenized", "data/tokenized", "--base_results", "data/eval/base",
                 "--samples", "data/eval/samples.jsonl",
                 "--prompts", "metrics/eval_prompts.jsonl", "--metrics", "metrics/eval.json"]


def test_max_length_above_model_context(project_with_base, monkeypatch, capsys):
    context = json.loads((project_with_base / "models/base/config.json").read_text())["max_position_embeddings"]
    write_params(project_with_base, {"tokenize": {"max_length": context * 2}})
    line = run_script("stages.tokenize", TOKENIZE_ARGS, project_with_base, monkeypatch, capsys)
    assert "tokenize.max_length" in line and str(context * 2) in line and str(context) in line
    record("max-length-above-model-context", "tokenize", line)
    check_clean(project_with_base, "tokenize")


def test_tokenize_before_format(project_with_base, monkeypatch, capsys):
    line = run_script("stages.tokenize", TOKENIZE_ARGS, project_with_base, monkeypatch, capsys)
    assert "data/formatted/train.jsonl" in line and "no such file" in line
    record("tokenize-before-format", "tokenize", line)
    check_clean(project_with_base, "tokenize")


def test_lora_target_the_model_lacks(project_with_base, monkeypatch, capsys):
    write_params(project_with_base, {"train": {"device": "cpu",
                                               "lora": {"target_modules": ["q_proj", "query_key_value"]}}})
    line = run_script("stages.train", COMMANDS["train"][2:], project_with_base, monkeypatch, capsys)
    assert "train.lora.target_modules" in line and "query_key_value" in line and "q_proj" in line
    record("lora-target-the-model-lacks", "train", line)
    check_clean(project_with_base, "train")


def test_cuda_asked_for_without_a_gpu(project_with_base, monkeypatch, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible here")
    write_params(project_with_base, {"train": {"device": "cuda"}})
    line = run_script("stages.train", COMMANDS["train"][2:], project_with_base, monkeypatch, capsys)
    assert "device" in line and "cuda" in line and "no CUDA GPU" in line
    record("cuda-without-a-gpu", "train", line)
    check_clean(project_with_base, "train")


def garbage_json(folder: Path) -> None:
    (folder / "adapter_config.json").write_text("{not json")


def adapter_without_meta(folder: Path) -> None:
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))


def meta_but_garbage_adapter(folder: Path) -> None:
    (folder / "sabia_ift_train.json").write_text(json.dumps(
        {"quantization": "none", "double_quant": False, "precision": "fp32", "base": {}}))
    (folder / "adapter_config.json").write_text("{not json")


def corrupt_meta(folder: Path) -> None:
    (folder / "sabia_ift_train.json").write_text('{"quantization": "no')


@pytest.mark.parametrize(
    ("damage", "expect"),
    [
        (adapter_without_meta, ["models/adapter/sabia_ift_train.json", "missing", "incomplete"]),
        (corrupt_meta, ["models/adapter/sabia_ift_train.json", "corrupt"]),
        (meta_but_garbage_adapter, ["models/adapter", "not a loadable PEFT adapter"]),
    ],
    ids=["no-train-meta", "corrupt-train-meta", "garbage-adapter-config"],
)
def test_corrupt_adapter_at_evaluate(project_with_base, monkeypatch, capsys, damage, expect, request):
    from sabia_ift.artifacts import TRAIN_META

    assert TRAIN_META == "sabia_ift_train.json"
    adapter = project_with_base / "models" / "adapter"
    adapter.mkdir(parents=True)
    damage(adapter)
    write_params(project_with_base, {"evaluate": {"device": "cpu"}})
    line = run_script("stages.evaluate", EVALUATE_ARGS, project_with_base, monkeypatch, capsys)
    for word in expect:
        assert word in line, f"{word!r} not in {line!r}"
    record(request.node.callspec.id, "evaluate", line)
    check_clean(project_with_base, "evaluate")


# --- Empty fields are dropped and counted, not errors ----------------------------------------


def test_empty_fields_are_dropped_and_counted(tmp_path):
    rows = [ok(i) for i in range(1, 13)]
    rows[2] = {"instruction": "", "input": "x", "output": "y"}           # row 3
    rows[4] = {"instruction": " \t\n ", "input": "", "output": "y"}      # row 5: whitespace only
    rows[6] = {"instruction": "a", "input": "", "output": ""}            # row 7
    rows[7] = {"instruction": "b", "input": "c", "output": "\u00a0 \n"}  # row 8: no-break space only
    rows[9] = dict(rows[0])                                             # row 10: duplicate of row 1
    case = Case("empty", "format", [], before=["fetch"],
                **data("in.jsonl", jsonl(*rows)))
    case.params["format"] = {"val_size": 2, "test_size": 2, "seed": 1}
    project = setup(case, tmp_path)
    for name in ("fetch", "format"):
        done = stage(project, name)
        assert done.returncode == 0, done.stderr
    metrics = json.loads((project / "metrics/format.json").read_text())
    assert metrics["rows_in"] == 12
    assert metrics["dropped_empty_instruction"] == 2
    assert metrics["dropped_empty_output"] == 2
    assert metrics["dropped_duplicate"] == 1
    assert metrics["rows_out"] == 7 == metrics["train_rows"] + metrics["val_rows"] + metrics["test_rows"]
    dropped = [json.loads(line) for line in (project / "data/formatted/dropped.jsonl").read_text().splitlines()]
    assert dropped == [
        {"source_row": 3, "reason": "empty_instruction"},
        {"source_row": 5, "reason": "empty_instruction"},
        {"source_row": 7, "reason": "empty_output"},
        {"source_row": 8, "reason": "empty_output"},
        {"source_row": 10, "reason": "duplicate", "duplicate_of": 1},
    ]
    kept = [json.loads(line)["source_row"] for split in ("train", "val", "test")
            for line in (project / f"data/formatted/{split}.jsonl").read_text().splitlines()]
    assert sorted(kept) == [1, 2, 4, 6, 9, 11, 12]


def test_excel_csv_with_bom_and_mapping_is_read(tmp_path):
    """Not bad input: a UTF-8 BOM (Excel) must not hide the first column's name."""
    content = "\ufeffpergunta;contexto;resposta\n".replace(";", ",") + "Qual é a cor do céu?,,Azul.\n"
    case = Case("bom", "fetch", [], **data("in.csv", content.encode("utf-8"),
                                           columns={"instruction": "pergunta", "input": "contexto",
                                                    "output": "resposta"}))
    project = setup(case, tmp_path)
    done = stage(project, "fetch")
    assert done.returncode == 0, done.stderr
    row = json.loads((project / "data/raw/rows.jsonl").read_text())
    assert row == {"instruction": "Qual é a cor do céu?", "input": "", "output": "Azul.", "source_row": 1}


def formatted(project: Path, splits: dict[str, list[dict]]) -> None:
    """data/formatted as the format stage writes it, from {split: [{instruction, output}]}."""
    from sabia_ift.template import build_prompt

    folder = project / "data" / "formatted"
    folder.mkdir(parents=True)
    n = 0
    for split, rows in splits.items():
        lines = []
        for r in rows:
            n += 1
            lines.append({"prompt": build_prompt(r["instruction"]), "response": r["output"],
                          "instruction": r["instruction"], "input": "", "source_row": n})
        (folder / f"{split}.jsonl").write_bytes(jsonl(*lines))


def test_tokenize_drops_too_many_rows(project_with_base, monkeypatch, capsys):
    """The issue's exam questions: most rows too long for max_length, once dropped without a word."""
    long = {"instruction": "Resuma o texto.", "output": "uma frase longa de resposta " * 40}
    formatted(project_with_base, {"train": [ok(1), ok(2), long, long, long], "val": [ok(3), long],
                                  "test": [ok(4)]})
    write_params(project_with_base, {"tokenize": {"max_length": 96}})
    line = run_script("stages.tokenize", TOKENIZE_ARGS, project_with_base, monkeypatch, capsys)
    for word in ("tokenize.max_drop_share", "4 of 8 rows (50.0%)", "tokenize.max_length 96",
                 "train 3 of 5, val 1 of 2, test 0 of 1", "would keep 95% of rows", "overlength: truncate"):
        assert word in line, f"{word!r} not in {line!r}"
    record("tokenize-drops-too-many-rows", "tokenize", line)
    check_clean(project_with_base, "tokenize")


def test_data_file_unreadable(tmp_path, monkeypatch, capsys):
    """Permission denied is one line too. Tests may run as root, who reads anything: then the
    refusal is simulated where the stage opens the file."""
    case = Case("unreadable", "fetch", [], **data("in.jsonl", jsonl(ok(1))))
    project = setup(case, tmp_path)
    target = project / "data" / "in.jsonl"
    target.chmod(0)
    if os.geteuid() == 0:
        real_open = Path.open

        def refuse(self, *args, **kwargs):
            if self.name == "in.jsonl":
                raise PermissionError(13, "Permission denied", str(self))
            return real_open(self, *args, **kwargs)

        monkeypatch.setattr(Path, "open", refuse)
    line = run_script("stages.fetch", ["--out", "data/raw"], project, monkeypatch, capsys)
    assert "data/in.jsonl" in line and "cannot be read" in line and "Permission denied" in line
    record("data-file-unreadable", "fetch", line)
    check_clean(project, "fetch")


def test_fetch_into_a_read_only_folder(tmp_path, monkeypatch, capsys):
    """A folder the stage may not write into is one line naming the output and the folder, and
    nothing is left. Root writes anywhere: then the system's refusal is simulated where it comes,
    when io.atomic_path creates the output's temporary folder."""
    project = setup(Case("read-only", "fetch", [], **data("in.jsonl", jsonl(ok(1)))), tmp_path)
    folder = project / "data"
    folder.chmod(0o555)
    if os.geteuid() == 0:
        import tempfile

        real_mkdtemp = tempfile.mkdtemp

        def refuse(suffix=None, prefix=None, dir=None):
            if dir is not None and Path(dir).absolute() == folder:
                raise PermissionError(errno.EACCES, "Permission denied", os.path.join(dir, f"{prefix}k1ll3d00"))
            return real_mkdtemp(suffix, prefix, dir)

        monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    try:
        line = run_script("stages.fetch", ["--out", "data/raw"], project, monkeypatch, capsys)
    finally:
        folder.chmod(0o755)
    for word in ("data/raw", "cannot be written", "Permission denied", "folder data"):
        assert word in line, f"{word!r} not in {line!r}"
    record("fetch-into-read-only-folder", "fetch", line)
    check_clean(project, "fetch")


def test_check_params_names_a_tracker_that_is_not_installed(tmp_path, monkeypatch, capsys):
    """`dvc exp run` removed models/adapter before the train stage found wandb missing; check-params
    and run-preset said nothing. Whether wandb is installed here or not, it is missing for this test."""
    import importlib.util

    from sabia_ift import presets
    from sabia_ift.cli import main

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "wandb" else real_find_spec(name, *args))
    project = make_project(tmp_path / "project", git=False)
    write_params(project, {"train": {"report_to": ["dvclive", "wandb"]}})
    monkeypatch.chdir(project)
    assert main(["check-params"]) == 2
    line = error_line(capsys.readouterr().err)
    for word in ("params.yaml", "train.report_to", "wandb is not installed", "pip install wandb"):
        assert word in line, f"{word!r} not in {line!r}"
    record("report-to-not-installed", "check-params", line)

    (project / "presets" / "wandb.yaml").write_text("train:\n  report_to: [dvclive, wandb]\n")
    write_params(project, {"train": {"report_to": ["dvclive"]}})
    monkeypatch.setattr(presets.subprocess, "run", lambda *a, **k: pytest.fail("dvc exp run was started"))
    assert main(["run-preset", "wandb"]) == 2
    assert "train.report_to: wandb is not installed" in error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    ("argv", "expect"),
    [
        (["generate", ""], ["instruction is empty"]),
        (["generate", " \u200b\u2060\n\ufeff "], ["instruction is empty", "invisible characters"]),
        (["generate", "Qual é a capital do Ceará?", "--max-new-tokens", "0"], ["max_new_tokens", "at least 1",
                                                                              "got 0"]),
    ],
    ids=["generate-empty-instruction", "generate-invisible-instruction", "generate-zero-new-tokens"],
)
def test_generate_refuses_before_loading_a_model(tmp_path, monkeypatch, capsys, argv, expect, request):
    """No model here: a check made only after loading would name the missing model instead."""
    from sabia_ift.cli import main

    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--device", "cpu"]) == 2
    line = error_line(capsys.readouterr().err)
    for word in expect:
        assert word in line, f"{word!r} not in {line!r}"
    record(request.node.callspec.id, "generate", line)


# --- Not errors: input that must be read as it is --------------------------------------------


@pytest.mark.parametrize("name", ["in.jsonl.gz", "in.json.gz", "in.csv.gz"])
def test_gzipped_data_is_read(tmp_path, name):
    """Large dumps ship gzipped; the manifest says so and keeps the archive's sha256."""
    rows = [ok(1), ok(2), ok(3)]
    if name.startswith("in.jsonl"):
        raw = jsonl(*rows)
    elif name.startswith("in.json"):
        raw = json.dumps(rows, ensure_ascii=False).encode()
    else:
        raw = ("instruction,input,output\n" + "".join(f"{r['instruction']},,{r['output']}\n" for r in rows)).encode()
    project = setup(Case("gz", "fetch", [], **data(name, gzip.compress(raw, mtime=0))), tmp_path)
    done = stage(project, "fetch")
    assert done.returncode == 0, done.stderr
    got = [json.loads(line) for line in (project / "data/raw/rows.jsonl").read_text().splitlines()]
    assert got == [{**r, "source_row": i} for i, r in enumerate(rows, start=1)]
    assert json.loads((project / "data/raw/manifest.json").read_text())["compression"] == "gzip"


def test_csv_cell_over_python_default_limit_is_read(tmp_path):
    """Python's csv refuses cells over 131,072 characters by default; a long context is a valid cell."""
    context = "Era uma vez um texto muito longo. " * 6000  # about 200,000 characters
    content = f'instruction,input,output\nResuma.,"{context}",Curto.\n'.encode()
    project = setup(Case("big", "fetch", [], **data("in.csv", content)), tmp_path)
    done = stage(project, "fetch")
    assert done.returncode == 0, done.stderr
    row = json.loads((project / "data/raw/rows.jsonl").read_text())
    assert len(row["input"]) == len(context) > 131_072


def test_jsonl_source_rows_are_line_numbers(tmp_path):
    """Blank lines count: a JSON Lines row is named by the line an editor shows."""
    project = setup(Case("lines", "fetch", [], **data("in.jsonl", jsonl(ok(1)) + b"\n  \n" + jsonl(ok(2)))), tmp_path)
    done = stage(project, "fetch")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in (project / "data/raw/rows.jsonl").read_text().splitlines()]
    assert [r["source_row"] for r in rows] == [1, 4]


def test_stale_temporaries_of_a_killed_run_are_removed(tmp_path):
    """A SIGKILL skips every cleanup: the next run of the stage removes what it left."""
    project = setup(Case("stale", "fetch", [], **FIVE_ROWS), tmp_path)
    stale = project / "data" / ".raw.tmp-k1ll3d00"
    (stale / "rows.jsonl").parent.mkdir(parents=True)
    (stale / "rows.jsonl").write_text("half")
    (project / "data" / ".raw.old-k1ll3d00").mkdir()
    other = project / "data" / ".formatted.tmp-k1ll3d00"
    other.mkdir()
    done = stage(project, "fetch")
    assert done.returncode == 0, done.stderr
    assert not stale.exists() and not (project / "data" / ".raw.old-k1ll3d00").exists()
    assert other.exists()  # another target's temporary: its own stage removes it
    ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", "data/.raw.tmp-k1ll3d00"], cwd=REPO)
    assert ignored.returncode == 0, ".gitignore does not ignore atomic-write temporaries"


def test_train_loss_not_finite(project_with_base, monkeypatch, capsys, tokenizer):
    """A learning rate that makes the run diverge stops it with one line, not an adapter of NaN weights."""
    from sabia_ift.data.tokenization import tokenize

    formatted(project_with_base, {"train": [ok(i) for i in range(16)], "val": [], "test": []})
    tokenize(params_for("tokenize", max_length=128), tokenizer, 2048, project_with_base / "data" / "formatted",
             project_with_base / "data" / "tokenized")
    write_params(project_with_base, {"train": {
        "device": "cpu", "lr": 1e30, "max_steps": 4, "logging_steps": 1, "save_steps": 100, "report_to": [],
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}}})
    line = run_script("stages.train", COMMANDS["train"][2:], project_with_base, monkeypatch, capsys)
    for word in ("train:", "became nan", "diverged", "train.lr is 1e+30", "lower train.lr"):
        assert word in line, f"{word!r} not in {line!r}"
    record("train-loss-not-finite", "train", line)
    for out in ("models/adapter", "metrics/train.json"):
        assert not (project_with_base / out).exists()
