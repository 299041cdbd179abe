"""Benchmark data: every task's rows, from a local file or the Hub, in the shapes the task YAMLs read.

The leaderboard's data sets come in their publishers' formats (ENEM JSON,
ASSIN 2 XML, FaQuAD in SQuAD format, TweetSentBR JSON) or in the layout of
the Hub copies the leaderboard reads; generic tasks come from any
json/jsonl/csv/parquet file with columns named in params. Each is converted
here to the rows sabia_ift/evaluation/tasks/utils.py documents; sampling.py
then picks the few-shot examples and the rows scored. A bad row is a DataError naming the
file, the 1-based row and the key.
"""

from __future__ import annotations

import json
import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import BenchmarkTask, is_commit_sha
from ..datafiles import TABLE_FORMATS, cannot_read, iter_rows, open_bytes, read_json, suffix_format
from ..errors import ConfigError, DataError
from .sampling import select

log = logging.getLogger(__name__)

LETTERS = "ABCDEFGHIJ"
YES, NO = "Sim", "Não"
SENTIMENTS = ("Positivo", "Neutro", "Negativo")

# The leaderboard's few-shot counts, and the examples it shows (by id, in
# order) where it names them; a pool without those ids gives its first rows.
DEFAULT_FEWSHOT = {"enem": 3, "assin2_rte": 15, "assin2_sts": 15, "faquad_nli": 15, "tweetsentbr": 25,
                   "multiple_choice": 3, "classification": 3}
ENEM_FEWSHOT_IDS = ("2022_21", "2022_88", "2022_143")
ASSIN2_FEWSHOT_IDS = (1, 3251, 2, 3252, 3, 4, 5, 6, 3253, 7, 3254, 3255, 3256, 8, 9, 10, 3257, 11, 3258,
                      12, 13, 14, 15, 3259, 3260, 3261, 3262, 3263, 16, 17, 3264, 18, 3265, 3266, 3267,
                      19, 20, 3268, 3269, 21, 3270, 3271, 22, 3272, 3273, 23, 3274, 24, 25, 3275)
# Hub splits of the leaderboard's copies: (test split, few-shot split).
HUB_SPLITS = {"enem": ("train", "train"), "assin2_rte": ("test", "train"), "assin2_sts": ("test", "train"),
              "faquad_nli": ("test", "train"), "tweetsentbr": ("test", "train")}


@dataclass
class TaskData:
    test: list[dict[str, Any]]        # the rows scored
    fewshot: list[dict[str, Any]]
    source: dict[str, Any]
    available: int                    # rows that could be scored, before limit
    duplicates_removed: int           # rows repeating an earlier row
    fewshot_duplicates_removed: int   # rows repeating a few-shot example


# Reading files -----------------------------------------------------------------

def _format(path: Path, declared: str, key: str) -> str:
    if declared != "auto":
        return declared
    found = suffix_format(path, {**TABLE_FORMATS, ".xml": "xml"})
    if found is None:
        raise ConfigError(f"{key}: cannot tell the format of {path} from its suffix; set file_format")
    return found


def _load_json(path: Path, key: str) -> Any:
    return read_json(path, key)


def read_table(path: Path, file_format: str, key: str) -> list[dict[str, Any]]:
    """Row objects of a json (list), jsonl, csv or parquet file, read as the fetch stage reads its
    file (sabia_ift/datafiles.py: gzip, BOM, encodings, nesting, long CSV cells); `key` names it in params."""
    if file_format not in TABLE_FORMATS.values():
        raise DataError(f"{path}: {file_format} files hold no table of rows; use json, jsonl, csv or parquet")
    return [row for _, row in iter_rows(path, file_format, key=key)]


def _field(row: dict, key: str, where: str) -> Any:
    if key not in row or row[key] is None or (isinstance(row[key], str) and not row[key].strip()):
        raise DataError(f"{where}: key {key}: missing or empty")
    return row[key]


def _text(row: dict, key: str, where: str) -> str:
    return " ".join(str(_field(row, key, where)).split())


# Generic tasks -----------------------------------------------------------------

def _choice_list(row: dict, task: BenchmarkTask, where: str) -> list[str]:
    cols = task.columns
    if cols.choice_columns:
        return [_text(row, c, where) for c in cols.choice_columns]
    assert cols.choices is not None  # the schema asks for choices or choice_columns
    value = _field(row, cols.choices, where)
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)  # a list column written into CSV as JSON
        except json.JSONDecodeError:
            raise DataError(f"{where}: key {cols.choices}: not a JSON list of choices") from None
    if not isinstance(value, list) or not 2 <= len(value) <= len(LETTERS):
        raise DataError(f"{where}: key {cols.choices}: expected a list of 2 to {len(LETTERS)} choices, "
                        f"got {value!r}")
    choices = [" ".join(str(v).split()) if v is not None else "" for v in value]
    if not all(choices):
        raise DataError(f"{where}: key {cols.choices}: choice {LETTERS[choices.index('')]} is missing or empty")
    return choices


def multiple_choice_row(row: dict, task: BenchmarkTask, where: str, index: int) -> dict[str, Any]:
    cols = task.columns
    choices = _choice_list(row, task, where)
    answer = str(_field(row, cols.answer, where)).strip().upper()
    letters = LETTERS[: len(choices)]
    if answer not in letters:
        raise DataError(f"{where}: key {cols.answer}: answer {answer!r} is not among the choices "
                        f"{', '.join(letters)}")
    ident = str(row[cols.id]) if cols.id and cols.id in row else str(index)
    return {"id": ident, "question": _text(row, cols.question, where), "choices": choices, "answer": answer}


def classification_row(row: dict, task: BenchmarkTask, where: str, index: int) -> dict[str, Any]:
    cols = task.columns
    labels = task.labels or []  # the schema requires them for classification
    label = str(_field(row, cols.label, where)).strip()
    if label not in labels:
        raise DataError(f"{where}: key {cols.label}: unknown label {label!r}; the task's labels are "
                        f"{', '.join(labels)}")
    ident = str(row[cols.id]) if cols.id and cols.id in row else str(index)
    return {"id": ident, "text": _text(row, cols.text, where), "label": label, "labels": list(labels)}


# The leaderboard's data sets ------------------------------------------------------

def enem_rows(data: list[dict], path: str) -> list[dict[str, Any]]:
    """ENEM questions: the publishers' JSON (options, label; IU marks questions that need an image,
    which a text model cannot answer and the leaderboard leaves out) or the Hub copy's layout."""
    rows = []
    for i, row in enumerate(data, start=1):
        where = f"{path}: row {i}"
        if "options" in row:
            if row.get("IU"):
                continue
            # Some stems sit wholly in `context`, with an empty `question`.
            parts = [" ".join(str(row.get(k) or "").split()) for k in ("context", "question")]
            question = "\n".join(p for p in parts if p)
            if not question:
                raise DataError(f"{where}: key question: missing or empty (and no context)")
            choices = [" ".join(str(c).split()) for c in _field(row, "options", where)]
            answer = str(_field(row, "label", where)).strip().upper()
        else:
            question = _text(row, "question", where)
            choices = [" ".join(str(c).split()) for c in _field(row, "choices", where)["text"]]
            answer = str(_field(row, "answerKey", where)).strip().upper()
        if len(choices) < 2 or not all(choices):
            raise DataError(f"{where}: key options: missing choices")
        if answer not in LETTERS[: len(choices)]:
            raise DataError(f"{where}: key label: answer {answer!r} is not among the choices "
                            f"{', '.join(LETTERS[:len(choices)])}")
        rows.append({"id": str(row.get("id", i)), "question": question, "choices": choices, "answer": answer})
    return rows


def assin2_rows(data: list[dict], path: str, *, similarity: bool) -> list[dict[str, Any]]:
    """ASSIN 2 pairs, from the XML corpus (read_assin2_xml) or the Hub copy's layout."""
    rows = []
    for i, row in enumerate(data, start=1):
        where = f"{path}: row {i}"
        ident = row.get("sentence_pair_id", row.get("id", i))
        doc = {"id": int(ident), "premise": _text(row, "premise", where),
               "hypothesis": _text(row, "hypothesis", where)}
        if similarity:
            score = float(_field(row, "relatedness_score", where))
            if not 1.0 <= score <= 5.0:
                raise DataError(f"{where}: key relatedness_score: {score} is outside 1.0 to 5.0")
            doc["score"] = score
        else:
            judgment = _field(row, "entailment_judgment", where)
            if judgment not in (0, 1, "0", "1"):
                raise DataError(f"{where}: key entailment_judgment: expected 0 or 1, got {judgment!r}")
            doc["label"] = YES if int(judgment) == 1 else NO
        rows.append(doc)
    return rows


def read_assin2_xml(path: Path, key: str) -> list[dict[str, Any]]:
    """The pairs of ASSIN 2's XML corpus (or a gzipped copy); a bad file or pair is one line naming it."""
    try:
        with open_bytes(path) as fh:
            root = ET.parse(fh).getroot()
    except ET.ParseError as exc:
        raise DataError(f"{path}: not valid XML: {exc}") from None
    except OSError as exc:
        raise cannot_read(path, exc, key) from None
    rows = []
    for i, pair in enumerate(root.iter("pair"), start=1):
        t, h = pair.find("t"), pair.find("h")
        if t is None or h is None or "entailment" not in pair.attrib:
            raise DataError(f"{path}: row {i}: key pair: needs <t>, <h> and an entailment attribute")
        ident, similarity = pair.get("id", str(i)), pair.get("similarity")
        if not ident.strip().isdigit():
            raise DataError(f"{path}: row {i}: key id: expected a whole number, got {ident!r}")
        if similarity is not None:
            try:
                float(similarity)
            except ValueError:
                raise DataError(f"{path}: row {i}: key similarity: expected a number, got {similarity!r}") from None
        rows.append({"sentence_pair_id": ident, "premise": t.text, "hypothesis": h.text,
                     "relatedness_score": similarity,
                     "entailment_judgment": 1 if pair.get("entailment") == "Entailment" else 0})
    return rows


# FaQuAD is partly lower-cased, so a sentence ends at . ! or ? and a space, whatever follows.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def faquad_nli_rows(data: Any, path: str) -> list[dict[str, Any]]:
    """FaQuAD-NLI pairs. From FaQuAD's SQuAD-format JSON they are built the way the
    leaderboard's copy was: every question paired with every sentence of its
    paragraph, "Sim" when the sentence holds (overlaps) one of the answer spans.
    The Hub copy's rows (question, answer, label 0/1) are taken as they are."""
    if isinstance(data, dict) and "data" in data:
        rows = []
        for d, doc in enumerate(data["data"]):
            for p, paragraph in enumerate(doc.get("paragraphs", [])):
                context = paragraph.get("context") or ""
                spans, start = [], 0
                for piece in _SENTENCE_END.split(context):
                    begin = context.index(piece, start)
                    spans.append((begin, begin + len(piece), piece))
                    start = begin + len(piece)
                for q, qa in enumerate(paragraph.get("qas", [])):
                    where = f"{path}: document {d + 1}, paragraph {p + 1}, question {q + 1}"
                    answers = [(a["answer_start"], a["answer_start"] + len(a["text"]))
                               for a in qa.get("answers", []) if "answer_start" in a and "text" in a]
                    if not answers:
                        raise DataError(f"{where}: key answers: no answer span")
                    question = _text(qa, "question", where)
                    for s, (begin, end, sentence) in enumerate(spans):
                        hit = any(a_begin < end and begin < a_end for a_begin, a_end in answers)
                        rows.append({"id": f"{qa.get('id', q)}-{s}", "question": question,
                                     "answer": " ".join(sentence.split()), "label": YES if hit else NO})
        return rows
    if not isinstance(data, list):
        raise DataError(f"{path}: expected SQuAD-format JSON (a `data` list) or rows of question, answer, label")
    rows = []
    for i, row in enumerate(data, start=1):
        where = f"{path}: row {i}"
        label = _field(row, "label", where)
        if label not in (0, 1, "0", "1"):
            raise DataError(f"{where}: key label: expected 0 or 1, got {label!r}")
        rows.append({"id": str(row.get("id", i)), "question": _text(row, "question", where),
                     "answer": _text(row, "answer", where), "label": YES if int(label) == 1 else NO})
    return rows


_SENTIMENT = {"1": "Positivo", "0": "Neutro", "-1": "Negativo",
              "Positive": "Positivo", "Neutral": "Neutro", "Negative": "Negativo"}


def tweetsentbr_rows(data: Any, path: str) -> list[dict[str, Any]]:
    """TweetSentBR: the publishers' JSON (id -> {text, sentiment -1/0/1, group}) or rows of
    sentence and label (Positive/Neutral/Negative) like the leaderboard's Hub copy."""
    items = list(data.values()) if isinstance(data, dict) else data
    rows = []
    for i, row in enumerate(items, start=1):
        where = f"{path}: row {i}"
        text_key, label_key = ("text", "sentiment") if "sentiment" in row else ("sentence", "label")
        label = str(_field(row, label_key, where)).strip()
        if label not in _SENTIMENT:
            raise DataError(f"{where}: key {label_key}: unknown label {label!r}")
        rows.append({"id": str(row.get("id", i)), "text": _text(row, text_key, where),
                     "label": _SENTIMENT[label], "labels": list(SENTIMENTS), "group": row.get("group")})
    return rows


# Few-shot pools -----------------------------------------------------------------

def _by_ids(pool: list[dict], ids: tuple, key: Callable[[dict], Any]) -> list[dict]:
    found = {key(row): row for row in pool}
    chosen = [found[i] for i in ids if i in found]
    return chosen if len(chosen) == len(ids) else []


def listed_fewshot(kind: str, source: list[dict]) -> list[dict]:
    """The leaderboard's few-shot examples in its order, where `source` holds them all; else none."""
    if kind == "enem":
        return _by_ids(source, ENEM_FEWSHOT_IDS, lambda r: r["id"].removeprefix("ENEM_"))
    if kind in ("assin2_rte", "assin2_sts"):
        return _by_ids(source, ASSIN2_FEWSHOT_IDS, lambda r: r["id"])
    return []


# Loading a task -------------------------------------------------------------------

def _convert(kind: str, task: BenchmarkTask, path: Path, file_format: str, key: str) -> list[dict[str, Any]]:
    where = str(path)
    if kind in ("multiple_choice", "classification"):
        table = read_table(path, file_format, key)
        make = multiple_choice_row if kind == "multiple_choice" else classification_row
        return [make(row, task, f"{where}: row {i}", i) for i, row in enumerate(table, start=1)]
    if kind in ("assin2_rte", "assin2_sts"):
        table = read_assin2_xml(path, key) if file_format == "xml" else read_table(path, file_format, key)
        return assin2_rows(table, where, similarity=kind == "assin2_sts")
    data = _load_json(path, key) if file_format == "json" else read_table(path, file_format, key)
    return {"enem": enem_rows, "faquad_nli": faquad_nli_rows, "tweetsentbr": tweetsentbr_rows}[kind](data, where)


def _local(task: BenchmarkTask, path_str: str, key: str, root: Path) -> list[dict[str, Any]]:
    path = Path(path_str)
    if not path.is_absolute():
        path = root / path
    if not path.is_file():
        raise ConfigError(f"{key}: {path_str} is not a file")
    rows = _convert(task.kind, task, path, _format(path, task.file_format, f"{key}"), key)
    if not rows:
        raise DataError(f"{path}: no rows for task {task.name}")
    return rows


def _hub(task: BenchmarkTask, split: str, key: str) -> list[dict[str, Any]]:
    import datasets

    if not is_commit_sha(task.revision):
        log.warning("%s: revision %r is not a commit sha; pin one so reruns read the same rows",
                    key, task.revision)
    try:
        data = datasets.load_dataset(task.dataset, revision=task.revision, split=split)
    except Exception as exc:
        raise DataError(f"{key}: Hub dataset {task.dataset} at revision {task.revision}, split {split}: "
                        f"{type(exc).__name__}: {exc}; set a local file in path instead") from None
    rows = data.to_list()
    where = f"{task.dataset}@{task.revision}:{split}"
    if task.kind in ("assin2_rte", "assin2_sts"):
        return assin2_rows(rows, where, similarity=task.kind == "assin2_sts")
    return {"enem": enem_rows, "faquad_nli": faquad_nli_rows, "tweetsentbr": tweetsentbr_rows}[task.kind](
        rows, where)


def load_task_data(task: BenchmarkTask, index: int, *, root: str | Path = ".", seed: int = 1234,
                   limit: int | None = None) -> TaskData:
    """Few-shot rows and the rows scored (at most `limit`, drawn with `seed`: sampling.py) of one
    task from params (benchmark.tasks[index])."""
    root = Path(root)
    key = f"benchmark.tasks.{index}"
    n = num_fewshot(task)
    if task.path is not None:
        rows = _local(task, task.path, f"{key}.path", root)
        pool = _local(task, task.fewshot_path, f"{key}.fewshot_path", root) if task.fewshot_path else None
        pool_name = f"fewshot_path {task.fewshot_path}"
        if task.kind == "tweetsentbr" and pool is None and any(r.get("group") for r in rows):
            # The publishers' file marks its own train and test rows.
            pool = [r for r in rows if r.get("group") == "train"]
            rows = [r for r in rows if r.get("group") != "train"]
            pool_name = f"the train rows of {task.path}"
        source: dict[str, Any] = {"path": task.path,
                                  **({"fewshot_path": task.fewshot_path} if task.fewshot_path else {})}
    else:
        test_split, fewshot_split = HUB_SPLITS[task.kind]
        rows = _hub(task, test_split, key)
        pool = _hub(task, fewshot_split, key) if fewshot_split != test_split else None
        pool_name = f"split {fewshot_split} of {task.dataset}"
        source = {"dataset": task.dataset, "revision": task.revision}
    where = f"{key}.num_fewshot: task {task.name} asks for {n} few-shot examples"
    if pool is not None and n > len(pool):
        raise ConfigError(f"{where}, but its few-shot pool ({pool_name}) has {len(pool)} "
                          f"row{'' if len(pool) == 1 else 's'}")
    if pool is None and n >= len(rows):
        raise ConfigError(f"{where} held out of its {len(rows)} rows, which leaves none to score; "
                          "lower num_fewshot or set fewshot_path")
    chosen = select(task.kind, rows, pool, num_fewshot=n, limit=limit, seed=seed,
                    listed=listed_fewshot(task.kind, rows if pool is None else pool))
    if not chosen.test:
        raise DataError(f"{key}: task {task.name} has nothing left to score: each of its "
                        f"{chosen.fewshot_duplicates_removed} rows repeats one of its {n} few-shot examples")
    return TaskData(chosen.test, chosen.fewshot, source, chosen.available, chosen.duplicates_removed,
                    chosen.fewshot_duplicates_removed)


def num_fewshot(task: BenchmarkTask) -> int:
    return DEFAULT_FEWSHOT[task.kind] if task.num_fewshot is None else task.num_fewshot
