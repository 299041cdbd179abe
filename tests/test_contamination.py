"""Contamination check: planted copies are found, clean data is not flagged, the policies do what they say."""

from __future__ import annotations

import difflib
import json
import random
from pathlib import Path

import pytest

from conftest import REPO, SHARED, params_for
from sabia_ift.config import BenchmarkConfig, ContaminationConfig
from sabia_ift.data.contamination import build_targets, check, gram_hashes, item_text, run_stage, scan, words
from sabia_ift.errors import ConfigError, DataError
from sabia_ift.evaluation import benchmark_data as bd
from sabia_ift.io import read_jsonl

PT_EVAL = SHARED / "pt-eval"
needs_pt_eval = pytest.mark.skipif(not PT_EVAL.is_dir(), reason="../shared/pt-eval is absent")


def cfg(**overrides) -> ContaminationConfig:
    return params_for("contamination", **overrides)


def bundled() -> list[dict]:
    return read_jsonl(REPO / "data" / "sample" / "instructions.jsonl")


def text_of(row: dict) -> str:
    return "\n".join(row[k] for k in ("instruction", "input", "output") if row.get(k))


def test_words_ignore_case_punctuation_spacing_and_compatibility_forms():
    assert words("Olá,  MUNDO!\nFim… ﬁm") == ["olá", "mundo", "fim", "fim"]
    assert words("São Paulo — 1.931") == words("são paulo 1 931")


def test_gram_hashes_hash_each_window_once():
    hashes = gram_hashes(__import__("numpy").arange(1, 8, dtype="uint64"), 3)
    assert len(hashes) == 5 and len(set(hashes.tolist())) == 5
    # The same words give the same hash wherever they stand.
    again = gram_hashes(__import__("numpy").array([9, 3, 4, 5], dtype="uint64"), 3)
    assert again[1] == hashes[2]
    assert len(gram_hashes(__import__("numpy").arange(2, dtype="uint64"), 3)) == 0


# The hashed scan against word-by-word comparison -----------------------------------------

def reference_pairs(rows: list[tuple[int, str]], items: list[tuple[str, str]], config: ContaminationConfig) -> dict:
    """{(row id, item id): (longest shared run in words, share of the item's words)} found by comparing
    word tuples directly, row by row and item by item."""
    found = {}
    for ident, text in rows:
        row = words(text)
        for item_id, item_text_ in items:
            item = words(item_text_)
            if len(item) < config.min_item_words:
                continue
            k = min(config.n, len(item))
            item_grams = {tuple(item[j:j + k]) for j in range(len(item) - k + 1)}
            row_grams = {tuple(row[j:j + k]) for j in range(len(row) - k + 1)}
            held = [j for j in range(len(row) - k + 1) if tuple(row[j:j + k]) in item_grams]
            if not held:
                continue
            longest = run = 1
            for before, after in zip(held, held[1:]):
                run = run + 1 if after == before + 1 else 1
                longest = max(longest, run)
            covered = {w for j in range(len(item) - k + 1) if tuple(item[j:j + k]) in row_grams
                       for w in range(j, j + k)}
            share = len(covered) / len(item)
            if share >= config.min_item_share:
                found[ident, item_id] = (longest + k - 1, round(share, 4))
    return found


def mixed_input(seed: int = 0) -> tuple[list[tuple[int, str]], list[tuple[str, str]]]:
    """Items of 2 to 30 words from a small vocabulary (so unrelated text shares short runs), and rows that
    copy them whole, in part, with a word changed, twice over, across each other, or not at all."""
    rng = random.Random(seed)
    vocab = [f"palavra{i}" for i in range(12)] + ["Olá,", "MUNDO!", "ﬁm", "São", "Paulo…"]
    items = [(f"i{i}", " ".join(rng.choices(vocab, k=rng.choice([2, 3, 4, 6, 9, 14, 22, 30])))) for i in range(40)]
    rows = []
    for i in range(300):
        a, b = (rng.choice(items)[1].split() for _ in range(2))
        cut = rng.randrange(len(a) + 1)
        text = rng.choice([
            " ".join(rng.choices(vocab, k=rng.randrange(0, 40))),
            " ".join(a).upper(),
            " ".join(a[:cut] + ["outra"] + a[cut + 1:]),
            " ".join(a[cut:] + b + a[:cut]),
            " ".join(a + rng.choices(vocab, k=3) + a),
            " ".join(a[: len(a) // 2]),
            "",
        ])
        rows.append((1000 + i, text))
    return rows, items


@pytest.mark.parametrize("share", [0.0, 0.5, 0.8, 1.0])
def test_the_hashed_scan_finds_what_comparing_words_finds(share):
    config = cfg(n=5, min_item_words=3, min_item_share=share)
    rows, items = mixed_input()
    expected = reference_pairs(rows, items, config)
    assert len(expected) > 50 or share == 1.0
    metrics, pairs, flagged = check(iter(rows), build_targets({"bench": items}, config), config)
    assert {(p["train_row"], p["item"]): (p["overlap_words"], p["item_share"]) for p in pairs} == expected
    assert flagged == sorted({row for row, _ in expected})
    # Chunks of any size give the same pairs: a gram never spans two rows.
    targets = build_targets({"bench": items}, config)
    for chunk_rows in (1, 7, 300):
        scanned = {(ident, targets.item_ids[number][1]): (overlap, round(s, 4))
                   for ident, found in scan(iter(rows), targets, chunk_rows=chunk_rows, min_share=share)
                   for number, (overlap, s) in found.items()}
        assert scanned == expected


# Planted contamination ---------------------------------------------------------------

def edits(item: str, filler: list[str], rng: random.Random) -> dict[str, str]:
    """The item copied verbatim and with light edits, as a translated corpus might hold it."""
    tokens = item.split()
    middle = len(tokens) // 2
    changed = [*tokens[:middle], "qualquer", *tokens[middle + 1:]]
    broken = [*tokens[:middle], "\n\n", *tokens[middle:]]
    return {
        "verbatim": item,
        "upper": item.upper(),
        "punctuation": " ".join(t.strip(".,;:!?") + ("," if i % 4 == 0 else "") for i, t in enumerate(tokens)),
        "one word changed": " ".join(changed),
        "line break": " ".join(broken),
        "inside a longer row": f"{rng.choice(filler)}\n\n{item}\n\n{rng.choice(filler)}",
    }


def planted(items: list[tuple[str, str]], clean: list[str], seed: int = 0) -> tuple[list[tuple[int, str]], dict]:
    """Clean rows with planted copies after them; {row id: (item id, edit)} of the planted ones."""
    rng = random.Random(seed)
    rows = list(enumerate(clean))
    plants = {}
    for ident, item in items:
        for edit, text in edits(item, clean, rng).items():
            plants[len(rows)] = (ident, edit)
            rows.append((len(rows), text))
    rng.shuffle(rows)
    return rows, plants


def long_items(items: list[tuple[str, str]], n: int, count: int) -> list[tuple[str, str]]:
    # One changed word in the middle leaves a whole n-gram on either side only from 2n + 1 words on.
    return [(i, t) for i, t in items if len(words(t)) >= 2 * n + 1][:count]


def assert_every_plant_found(items, clean, config, target="bench"):
    rows, plants = planted(items, clean)
    targets = build_targets({target: items}, config)
    metrics, pairs, flagged = check(iter(rows), targets, config)
    found = {(p["train_row"], p["item"]) for p in pairs}
    missed = [(row, plant) for row, plant in plants.items() if (row, plant[0]) not in found]
    assert not missed
    false = set(flagged) - set(plants)
    assert len(false) <= 0.01 * len(clean), f"{len(false)} clean rows flagged"
    assert metrics["rows_checked"] == len(rows)
    return metrics


def test_planted_test_rows_are_flagged_and_clean_rows_are_not():
    config = cfg()
    sample = bundled()
    test, train = sample[:200], sample[200:]
    items = long_items([(str(i), text_of(r)) for i, r in enumerate(test)], config.n, 15)
    assert len(items) == 15
    metrics = assert_every_plant_found(items, [text_of(r) for r in train], config, "test")
    assert metrics["targets"]["test"]["rows_flagged"] >= 15 * 6


def test_short_items_are_matched_whole_and_shorter_ones_counted():
    config = cfg()
    exam = bd.read_table(REPO / "data" / "sample" / "benchmark" / "exame.jsonl", "jsonl", "x")
    # Question and choices are the item: most are 8 to 12 words, under n.
    items = [(r["id"], "\n".join([r["pergunta"], *r["alternativas"]])) for r in exam]
    items = [(i, t) for i, t in items if config.min_item_words <= len(words(t)) < config.n][:10]
    assert len(items) == 10
    rows = [(0, "Uma resposta qualquer.\n" + items[0][1].upper()), (1, "Qual é a capital de Minas Gerais? Não sei.")]
    short = ("curto", "Cinco palavras bem curtas aqui")
    metrics, pairs, flagged = check(iter(rows), build_targets({"exame": [*items, short]}, config), config)
    assert flagged == [0] and pairs[0]["item"] == items[0][0]
    assert metrics["targets"]["exame"] == {"items": 11, "rows_flagged": 1, "share": 0.5, "items_too_short": 1}


@needs_pt_eval
def test_planted_enem_questions_are_flagged_in_the_bundled_data():
    config = cfg()
    enem = bd.enem_rows(bd.read_json(PT_EVAL / "enem2022.json", "x"), "enem2022.json")
    items = long_items([(r["id"], item_text(r)) for r in enem], config.n, 30)
    assert len(items) == 30
    assert_every_plant_found(items, [text_of(r) for r in bundled()], config)


# False positives on real train/test splits -----------------------------------------------

def pt_eval_splits() -> dict[str, tuple[list[dict], list[dict]]]:
    faquad = [bd.faquad_nli_rows(bd.read_json(PT_EVAL / f, "x"), f) for f in ("faquad_train.json", "faquad_dev.json")]
    tweets = bd.tweetsentbr_rows(bd.read_json(PT_EVAL / "tweetsentbr_poeta750.json", "x"), "tweetsentbr")
    assin = [bd.assin2_rows(bd.read_assin2_xml(PT_EVAL / f, "x"), f, similarity=False)
             for f in ("assin2-train-only.xml", "assin2-test.xml")]
    return {"faquad": (faquad[0], faquad[1]),
            "tweetsentbr": ([r for r in tweets if r["group"] == "train"], [r for r in tweets if r["group"] != "train"]),
            "assin2": (assin[0], assin[1])}


def flags(train: list[dict], test: list[dict], config: ContaminationConfig):
    targets = build_targets({"test": [(str(r["id"]), item_text(r)) for r in test]}, config)
    return check(((i, item_text(r)) for i, r in enumerate(train)), targets, config)


@needs_pt_eval
@pytest.mark.parametrize("name", ["faquad", "tweetsentbr"])
def test_train_splits_are_not_flagged_against_their_test_splits(name):
    train, test = pt_eval_splits()[name]
    metrics, _, _ = flags(train, test, cfg())
    assert metrics["targets"]["test"]["share"] <= 0.01


@needs_pt_eval
def test_every_assin2_flag_is_a_real_copy():
    # ASSIN 2 builds its pairs from shared sentences: train and test hold the same or
    # near-same sentences (docs/experiments.md gives the rate). Each flag must be one:
    # difflib, comparing word sequences directly, finds most of the item's sentences in the row
    # (each sentence on its own: a row may hold them in the other order).
    train, test = pt_eval_splits()["assin2"]
    config = cfg()
    _, pairs, _ = flags(train, test, config)
    assert pairs
    by_id = {str(r["id"]): r for r in test}
    for pair in pairs:
        row, item = words(item_text(train[pair["train_row"]])), by_id[pair["item"]]
        sentences = [words(item[key]) for key in ("premise", "hypothesis")]
        found = sum(b.size for s in sentences
                    for b in difflib.SequenceMatcher(None, row, s, autojunk=False).get_matching_blocks())
        assert found >= config.min_item_share * sum(map(len, sentences)) - 1, pair


# The stage ----------------------------------------------------------------------------

def formatted(folder: Path, train: list[str], test: list[str]) -> Path:
    folder.mkdir(parents=True)
    for split, texts in (("train", train), ("test", test), ("val", [])):
        with (folder / f"{split}.jsonl").open("w", encoding="utf-8") as fh:
            for i, text in enumerate(texts):
                fh.write(json.dumps({"instruction": "Responda.", "input": "", "response": text,
                                     "prompt": "x", "source_row": 100 * (split == "test") + i}) + "\n")
    return folder


@pytest.fixture
def project(tmp_path) -> Path:
    sample = [text_of(r) for r in bundled()]
    tests = long_items([(str(i), t) for i, t in enumerate(sample[:40])], 13, 3)
    train = [*sample[40:80], tests[0][1], f"Antes.\n{tests[1][1].lower()}\nDepois."]
    return formatted(tmp_path / "formatted", train, [t for _, t in tests])


def bench() -> BenchmarkConfig:
    return params_for("benchmark")


def test_report_lists_the_pairs_and_drops_nothing(project, tmp_path):
    metrics = run_stage(cfg(policy="report"), bench(), project, tmp_path / "out", root=REPO)
    assert metrics["rows_checked"] == 42 and metrics["rows_dropped"] == 0
    assert metrics["targets"]["test"] == {"items": 3, "rows_flagged": 2, "share": round(2 / 42, 6),
                                          "items_too_short": 0}
    assert set(metrics["targets"]) == {"test", "exame_toy", "paridade_toy"}
    assert {(p["train_row"], p["target"]) for p in metrics["longest"]} == {(40, "test"), (41, "test")}
    assert all(p["overlap_words"] >= 13 for p in metrics["longest"])
    assert len(read_jsonl(tmp_path / "out" / "flagged.jsonl")) == 2
    assert json.loads((tmp_path / "out" / "drop.json").read_text()) == {"policy": "report", "source_rows": []}


def test_drop_lists_the_flagged_rows_for_tokenize(project, tmp_path):
    from sabia_ift.artifacts import read_contaminated

    metrics = run_stage(cfg(policy="drop"), bench(), project, tmp_path / "out", root=REPO)
    assert metrics["rows_dropped"] == 2
    assert read_contaminated(tmp_path / "out") == {40, 41}


def test_fail_stops_with_the_counts_and_writes_nothing(project, tmp_path):
    with pytest.raises(DataError, match=r"2 of 42 training rows .*\(test 2\).*policy is fail"):
        run_stage(cfg(policy="fail"), bench(), project, tmp_path / "out", root=REPO)
    assert not (tmp_path / "out").exists()


def test_fail_passes_clean_data(tmp_path):
    sample = [text_of(r) for r in bundled()]
    folder = formatted(tmp_path / "formatted", sample[:30], sample[200:210])
    assert run_stage(cfg(policy="fail"), bench(), folder, tmp_path / "out", root=REPO)["rows_flagged"] == 0


def test_a_task_named_test_is_refused(project, tmp_path):
    tasks = [{**t.model_dump(exclude_none=True), "name": "test" if i == 0 else t.name}
             for i, t in enumerate(bench().tasks)]
    with pytest.raises(ConfigError, match="task named test"):
        run_stage(cfg(), params_for("benchmark", tasks=tasks), project, tmp_path / "out", root=REPO)


def test_bad_settings_name_their_key():
    with pytest.raises(ConfigError, match="contamination: min_item_words"):
        params_for("contamination", min_item_words=20)
    with pytest.raises(ConfigError, match="contamination.policy"):
        params_for("contamination", policy="ignore")
