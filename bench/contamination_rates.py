"""How often the contamination check flags clean data: each corpus's own train split against its test split.

The bundled sample goes through the fetch and format stages' code with
params.yaml's settings, then the contamination stage's (against the test split
and the default benchmark tasks). `../shared/pt-eval`'s data sets with a train
split are checked with their train rows as the training data and their test
rows as the only target: FaQuAD-NLI (train against dev), TweetSentBR (train
against the rest) and ASSIN 2 (train against test). Flags there are false
positives unless train and test really share text (ASSIN 2 builds its pairs from
shared sentences, so some of its flags are real near-copies):

    python bench/contamination_rates.py [--pt-eval ../shared/pt-eval] [--out bench/results]

Writes <out>/<machine>-<date>-contamination-rates.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.data_scale import machine, slug  # noqa: E402
from sabia_ift.config import load_section  # noqa: E402
from sabia_ift.data.contamination import build_targets, check, item_text, run_stage  # noqa: E402
from sabia_ift.data.formatting import format_rows  # noqa: E402
from sabia_ift.data.sources import fetch  # noqa: E402
from sabia_ift.evaluation import benchmark_data as bd  # noqa: E402


def bundled(params: Path) -> dict:
    """The default pipeline's contamination metrics on the bundled sample."""
    with tempfile.TemporaryDirectory() as tmp:
        fetch(load_section("fetch", params), Path(tmp) / "raw")
        format_rows(load_section("format", params), Path(tmp) / "raw", Path(tmp) / "formatted")
        return run_stage(load_section("contamination", params), load_section("benchmark", params),
                         Path(tmp) / "formatted", Path(tmp) / "contamination", root=REPO)


def pt_eval(root: Path) -> dict[str, tuple[list[dict], list[dict]]]:
    """{data set: (train rows, test rows)} of pt-eval's sets that have a train split."""
    faquad = [bd.faquad_nli_rows(bd.read_json(root / f, f), f) for f in ("faquad_train.json", "faquad_dev.json")]
    tweets = bd.tweetsentbr_rows(bd.read_json(root / "tweetsentbr_poeta750.json", "tweetsentbr"), "tweetsentbr")
    assin = [bd.assin2_rows(bd.read_assin2_xml(root / f, f), f, similarity=False)
             for f in ("assin2-train-only.xml", "assin2-test.xml")]
    return {"FaQuAD-NLI (train vs dev)": (faquad[0], faquad[1]),
            "TweetSentBR (train vs the rest)": ([r for r in tweets if r["group"] == "train"],
                                                [r for r in tweets if r["group"] != "train"]),
            "ASSIN 2 (train vs test)": (assin[0], assin[1])}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--pt-eval", type=Path, default=REPO.parent / "shared" / "pt-eval")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    cfg = load_section("contamination", args.params)

    start = time.process_time()
    metrics = bundled(args.params)
    results = {"bundled sample (train vs test split and benchmark tasks)": {
        "rows_checked": metrics["rows_checked"], "rows_flagged": metrics["rows_flagged"],
        "share": round(metrics["rows_flagged"] / metrics["rows_checked"], 6),
        "items": sum(t["items"] for t in metrics["targets"].values())}}
    if args.pt_eval.is_dir():
        for name, (train, test) in pt_eval(args.pt_eval).items():
            targets = build_targets({"test": [(str(r["id"]), item_text(r)) for r in test]}, cfg)
            found, _, _ = check(((i, item_text(r)) for i, r in enumerate(train)), targets, cfg)
            results[name] = {"rows_checked": found["rows_checked"], "rows_flagged": found["rows_flagged"],
                             "share": found["targets"]["test"]["share"], "items": len(test)}
    else:
        print(f"{args.pt_eval} is absent: the bundled sample only", file=sys.stderr)
    record = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "cpu_s": round(time.process_time() - start, 1),
              "settings": cfg.model_dump(), "rates": results}
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / f"{slug(record['machine'])}-{record['date']}-contamination-rates.json"
    target.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{'training data':58} {'rows':>6} {'flagged':>8} {'share':>7}")
    for name, r in results.items():
        print(f"{name:58} {r['rows_checked']:6,} {r['rows_flagged']:8,} {100 * r['share']:6.1f}%")
    print(f"written to {target}")


if __name__ == "__main__":
    main()
