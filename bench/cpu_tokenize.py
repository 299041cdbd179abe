"""Tokenize-stage throughput on this machine: rows/s and tokens/s of `tokenize_split`.

Measures the library function the tokenize stage calls (fast tokenizer, batched),
on the bundled sample and, where ../shared/pt-eval exists, on longer real
Portuguese rows (bench/pt_eval_rows.py). Run after `dvc repro base format`:

    python bench/cpu_tokenize.py [--base models/base] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from sabia_ift.config import section_from_params  # noqa: E402
from sabia_ift.data.formatting import clean_rows  # noqa: E402
from sabia_ift.data.tokenization import tokenize_split  # noqa: E402
from sabia_ift.io import read_jsonl  # noqa: E402
from sabia_ift.modeling import load_tokenizer  # noqa: E402


def rows_from(path: Path) -> list[dict]:
    raw = [{**r, "source_row": i + 1} for i, r in enumerate(read_jsonl(path))]
    return clean_rows(raw)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=REPO / "models" / "base")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    tokenizer = load_tokenizer(args.base)
    sets = {"bundled sample": rows_from(REPO / "data" / "sample" / "instructions.jsonl")}
    shared = REPO.parent / "shared" / "pt-eval"
    if shared.is_dir():
        import pt_eval_rows

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "rows.jsonl"
            pt_eval_rows.main([str(shared), str(path)])
            sets["FaQuAD + ENEM rows"] = rows_from(path)

    cfg = section_from_params("tokenize", {"max_length": 2048}, REPO / "params.yaml")
    print(f"{'data':20} {'rows':>6} {'mean tokens':>12} {'rows/s':>9} {'tokens/s':>10}")
    for name, rows in sets.items():
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            _, counts = tokenize_split(tokenizer, rows, cfg)
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        print(f"{name:20} {len(rows):6d} {counts['tokens'] / counts['rows']:12.1f} "
              f"{len(rows) / seconds:9.0f} {counts['tokens'] / seconds:10.0f}")


if __name__ == "__main__":
    main()
