"""The records stages hand each other, and the split of metrics into a compact metric and its detail."""

from sabia_ift.artifacts import split_metrics


def test_split_metrics_keeps_numbers_and_moves_named_keys_to_detail():
    full = {"max_length": 256, "overlength": "drop",
            "train": {"rows": 9, "rows_in": 10, "ok": True, "length": {"mean": 4.5, "max": 8}},
            "val": {"length": {"max": 3}}}
    compact, detail = split_metrics(full, ("length", "rows_in", "max_length"))
    assert compact == {"train": {"rows": 9}}
    assert detail == full
