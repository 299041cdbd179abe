"""Format stage: normalisation, counted drops, and random rows through format and tokenize."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import params_for
from sabia_ift.data.formatting import clean_rows, split_sizes
from sabia_ift.data.tokenization import tokenize_split
from sabia_ift.template import IGNORE_INDEX, encode_prompt
from sabia_ift.text import has_invisible, normalize_text


def test_normalize_text():
    assert normalize_text("  Olá,\r\nmundo!  \r\n\n\n\nTchau\u00a0 ") == "Olá,\nmundo!\n\nTchau"
    assert normalize_text("na\u0303o") == "não"  # a decomposed tilde composes (NFC)
    assert normalize_text("def f():\n    return 1") == "def f():\n    return 1"  # indentation survives
    assert normalize_text(" \t \n ") == ""


def test_drops_are_counted_and_point_back_to_the_source():
    rows = [
        {"instruction": "A?", "input": "", "output": "a", "source_row": 1},
        {"instruction": " ", "input": "", "output": "b", "source_row": 2},
        {"instruction": "C?", "input": "", "output": "\n", "source_row": 3},
        {"instruction": "A? ", "input": "", "output": "a", "source_row": 4},  # same after normalising
        {"instruction": "A?", "input": "x", "output": "a", "source_row": 5},  # different input: kept
    ]
    kept, dropped = clean_rows(rows)
    assert [r["source_row"] for r in kept] == [1, 5]
    assert dropped == [
        {"source_row": 2, "reason": "empty_instruction"},
        {"source_row": 3, "reason": "empty_output"},
        {"source_row": 4, "reason": "duplicate", "duplicate_of": 1},
    ]


def test_split_sizes_accept_counts_and_shares():
    assert split_sizes(1000, 100, 0.05) == (100, 50)


field = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=80)
row = st.fixed_dictionaries({"instruction": field, "input": field, "output": field})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(row, max_size=12))
def test_random_rows_through_format_and_tokenize(tokenizer, rows):
    numbered = [{**r, "source_row": i + 1} for i, r in enumerate(rows)]
    kept, dropped = clean_rows(numbered)
    # Every row is accounted for, exactly once.
    assert sorted([r["source_row"] for r in kept] + [d["source_row"] for d in dropped]) == list(range(1, len(rows) + 1))
    assert len({(r["instruction"], r["input"], r["response"]) for r in kept}) == len(kept)
    for r in kept:
        assert r["instruction"] and r["response"]
        assert normalize_text(r["response"]) == r["response"]  # idempotent
    examples, counts = tokenize_split(tokenizer, kept, params_for("tokenize", max_length=96, overlength="truncate"))
    assert counts["rows"] + counts["dropped_prompt_too_long"] + counts["dropped_too_long"] == len(kept)
    for ids, labels in zip(examples["input_ids"], examples["labels"]):
        assert len(ids) == len(labels) <= 96
        first_trained = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        assert all(label == IGNORE_INDEX for label in labels[:first_trained])
        assert labels[first_trained:] == ids[first_trained:]
        if ids[-1] == tokenizer.eos_token_id:
            assert labels[-1] == tokenizer.eos_token_id
    if counts["truncated"] == 0 and counts["boundary_fallback"] == 0:
        for _, ids in zip([r for r in kept if len(encode_prompt(tokenizer, r["prompt"])) < 95], examples["input_ids"]):
            assert ids[-1] == tokenizer.eos_token_id


def test_invisible_and_control_characters_are_removed():
    assert normalize_text("Olá\u200b mundo\u2060!\ufeff") == "Olá mundo!"
    assert normalize_text("pa\u00adla\u00advra") == "palavra"  # soft hyphens
    assert normalize_text("a\x00b\x07c\x1b[31md\x7f") == "abc[31md"  # NUL, BEL, ESC, DEL
    assert normalize_text("\u200b\u200b \u200d\ufeff") == ""  # nothing visible is empty
    assert normalize_text("linha 1\n\tlinha 2") == "linha 1\n linha 2"  # newline and tab are text
    assert normalize_text("👩\u200d💻") == "👩\u200d💻"  # joiners inside emoji stay


def test_vertical_tab_and_form_feed_separate_words():
    """They space words like a tab: deleting them glued "Resposta\\x0bcom" into one word."""
    assert normalize_text("Resposta\x0bcom\x0cespaço") == "Resposta com espaço"
    assert normalize_text("fim\x0b\x0c\nnova linha") == "fim\nnova linha"  # trailing spaces go, as for a tab
    assert normalize_text("\x0b\x0c") == ""
    assert not has_invisible("a\x0bb\x0cc")  # not counted as a removed invisible character


def test_invisible_rows_are_dropped_and_duplicates_found():
    rows = [
        {"instruction": "A?", "input": "", "output": "a", "source_row": 1},
        {"instruction": "\u200b", "input": "", "output": "b", "source_row": 2},     # only a zero-width space
        {"instruction": "C?", "input": "", "output": "\x00\x07", "source_row": 3},  # only control characters
        {"instruction": "A?\u200b", "input": "", "output": "a\ufeff", "source_row": 4},  # invisible tail
        {"instruction": "D?\x1b", "input": "", "output": "d", "source_row": 5},
    ]
    kept, dropped = clean_rows(rows)
    assert [(r["source_row"], r["instruction"]) for r in kept] == [(1, "A?"), (5, "D?")]
    assert "\x1b" not in kept[1]["prompt"]
    assert dropped == [
        {"source_row": 2, "reason": "empty_instruction"},
        {"source_row": 3, "reason": "empty_output"},
        {"source_row": 4, "reason": "duplicate", "duplicate_of": 1},
    ]


def test_invisible_characters_are_counted(tmp_path):
    from sabia_ift.data.formatting import format_rows
    from sabia_ift.io import write_jsonl

    rows = [{"instruction": f"P{i}?", "input": "", "output": f"R{i}.", "source_row": i} for i in range(1, 9)]
    rows[2]["output"] += "\u200b"
    rows[5]["instruction"] = "\u200b"
    write_jsonl(tmp_path / "raw" / "rows.jsonl", rows)
    counts = format_rows(params_for("format", val_size=0, test_size=1), tmp_path / "raw", tmp_path / "out")
    assert counts["cleaned_invisible_chars"] == 2 and counts["dropped_empty_instruction"] == 1
    assert (counts["train_rows"], counts["val_rows"], counts["test_rows"]) == (6, 0, 1)


def test_a_share_never_rounds_a_split_away():
    # 0.1 of 3 rows would round to 0: a share asks for a split, so it gets one row.
    assert split_sizes(3, 0.1, 0.1) == (1, 1)
    assert split_sizes(3, 0, 0.1) == (0, 1)
    assert split_sizes(1000, 0.0004, 0) == (1, 0)


def test_duplicates_are_whole_rows_not_their_text_run_together():
    """Rows are told apart by a digest of each field in turn: moving text from one field to the
    next makes another row."""
    rows = [
        {"instruction": "ab", "input": "c", "output": "x", "source_row": 1},
        {"instruction": "a", "input": "bc", "output": "x", "source_row": 2},
        {"instruction": "a", "input": "", "output": "bcx", "source_row": 3},
        {"instruction": "a", "input": "bc", "output": "x", "source_row": 4},
    ]
    kept, dropped = clean_rows(rows)
    assert [r["source_row"] for r in kept] == [1, 2, 3]
    assert dropped == [{"source_row": 4, "reason": "duplicate", "duplicate_of": 2}]


def test_format_streams_to_the_same_splits_as_cleaning_in_memory(tmp_path):
    """The stage's two passes over the file give clean_rows' rows, split by the seeded shuffle."""
    import random

    from sabia_ift.data.formatting import format_rows, split_sizes
    from sabia_ift.io import read_jsonl, write_jsonl
    from sabia_ift.toy.sample import generate_rows

    rows = [{**r, "source_row": i + 1} for i, r in enumerate(generate_rows(3))]
    write_jsonl(tmp_path / "raw" / "rows.jsonl", rows)
    cfg = params_for("format", val_size=0.1, test_size=37, seed=5)
    counts = format_rows(cfg, tmp_path / "raw", tmp_path / "out")
    kept, dropped = clean_rows(rows)
    val_n, test_n = split_sizes(len(kept), cfg.val_size, cfg.test_size)
    order = list(range(len(kept)))
    random.Random(cfg.seed).shuffle(order)
    picks = {"test": order[:test_n], "val": order[test_n:test_n + val_n], "train": order[test_n + val_n:]}
    for split, chosen in picks.items():
        assert read_jsonl(tmp_path / "out" / f"{split}.jsonl") == [kept[i] for i in sorted(chosen)]
        assert counts[f"{split}_rows"] == len(chosen)
    assert read_jsonl(tmp_path / "out" / "dropped.jsonl") == dropped
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["dropped.jsonl", "test.jsonl", "train.jsonl",
                                                                     "val.jsonl"]
