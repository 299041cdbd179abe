"""Format stage: normalisation, counted drops, and random rows through format and tokenize."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import params_for
from sabia_ift.data.formatting import clean_rows, split_sizes
from sabia_ift.data.tokenization import tokenize_split
from sabia_ift.template import IGNORE_INDEX, encode_prompt
from sabia_ift.text import normalize_text


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
