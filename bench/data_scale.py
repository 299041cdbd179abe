"""The data stages at scale: fetch, format and tokenize on a synthetic Canarim-shaped corpus.

Writes a corpus of Portuguese instruction rows the project generates (the
bundled sample's generator, sabia_ift/toy/sample.py, recombined): an
instruction, an input on 40% of rows, an output of a few hundred tokens, a few
duplicate rows and empty outputs for the format stage to drop, about 300
tokens a row with the prompt. Then runs the three stage scripts as dvc.yaml's
cmd lines do, with a params file of their own, and records each stage's wall
time, CPU time and peak RSS (os.wait4 on the stage's process):

    python bench/data_scale.py [--rows 1000000] [--work /tmp/data-scale] [--out bench/results]
    python bench/data_scale.py --rows 300000 --code ../old-checkout   # another checkout's stages, same corpus

The tokenize stage needs a base model's tokenizer: --base names a models/base
folder; without it the tiny default is built in the work folder (the base
stage, no pretraining: only its tokenizer is used). Writes
<out>/<machine>-<date>-data-scale.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sabia_ift.toy.sample import generate_rows, is_planted_defect  # noqa: E402

DUPLICATE_SHARE = 0.002
EMPTY_OUTPUT_SHARE = 0.0005


def corpus(path: Path, rows: int, seed: int = 0) -> dict:
    """Write `rows` Canarim-shaped rows as JSON Lines; what was written."""
    pieces = [row for s in range(3) for i, row in enumerate(generate_rows(s)) if not is_planted_defect(i)]
    prose = [" ".join(part for part in (r["instruction"], r["input"], r["output"]) if part) for r in pieces]
    rng = random.Random(seed)
    recent: list[str] = []
    with_input = 0
    with path.open("w", encoding="utf-8") as fh:
        for _ in range(rows):
            draw = rng.random()
            if recent and draw < DUPLICATE_SHARE:
                line = rng.choice(recent)
            else:
                output = " ".join(rng.choices(prose, k=max(1, int(rng.lognormvariate(1.55, 0.6)))))
                row = {"instruction": rng.choice(pieces)["instruction"],
                       "input": " ".join(rng.choices(prose, k=rng.randint(1, 4))) if rng.random() < 0.4 else "",
                       "output": "" if draw > 1 - EMPTY_OUTPUT_SHARE else output}
                line = json.dumps(row, ensure_ascii=False) + "\n"
                recent = (recent + [line])[-1000:]
            with_input += '"input": ""' not in line
            fh.write(line)
    return {"rows": rows, "bytes": path.stat().st_size, "with_input": with_input}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "cpu")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "memory_gib": round(memory / 2**30, 1),
            "python": platform.python_version()}


def slug(machine_: dict) -> str:
    """A results file's machine part: CPU model and cores, lower case, letters and digits."""
    name = re.sub(r"\((r|tm)\)", "", f"{machine_['cpu']}-{machine_['cores']}cpu".lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def run_stage(name: str, args: list[str], code: Path, log: Path) -> dict:
    """Run one stage script; its wall and CPU time and peak RSS, and the machine's load around it."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", f"stages.{name}", *args], cwd=code, stdout=out,
                                   stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(code)})
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    code_ = os.waitstatus_to_exitcode(status)
    if code_ != 0:
        raise SystemExit(f"stage {name} failed ({code_}); see {log}:\n{log.read_text()[-2000:]}")
    return {"wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "load_before": round(load, 2),
            "load_after": round(os.getloadavg()[0], 2)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/data-scale"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--base", type=Path, default=None, help="a models/base folder (default: build the tiny one)")
    parser.add_argument("--code", type=Path, default=REPO, help="the checkout whose stage scripts run")
    parser.add_argument("--name", default="data-scale", help="the results file's last part")
    parser.add_argument("--until", choices=["fetch", "format", "contamination", "tokenize"], default=None,
                        help="stop after this stage (default: run all)")
    args = parser.parse_args(argv)
    work, code = args.work.resolve(), args.code.resolve()
    work.mkdir(parents=True, exist_ok=True)

    data = work / f"canarim-like-{args.rows}.jsonl"
    if not data.exists():  # a corpus is reused; a killed run leaves only the partial file
        start = time.perf_counter()
        partial = data.with_suffix(".partial")
        written = corpus(partial, args.rows)
        partial.rename(data)
        print(f"corpus: {written} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    # The real run's data settings (presets/sabia-7b.yaml), on every row of the corpus.
    params["fetch"].update(path=str(data), max_rows=None)
    params["format"].update(val_size=1500, test_size=1500)
    params["tokenize"].update(max_length=2048, overlength="drop")
    params_file = work / "params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True), encoding="utf-8")

    base = args.base
    if base is None and args.until in (None, "tokenize"):
        base = work / "models" / "base"
        if not (base / "base.json").exists():
            tiny = {**params, "base": {**params["base"], "tiny": {**params["base"]["tiny"], "pretrain_epochs": 0}}}
            (work / "params-base.yaml").write_text(yaml.safe_dump(tiny, sort_keys=False), encoding="utf-8")
            run_stage("base", ["--params", str(work / "params-base.yaml"), "--out", str(base)], REPO,
                      work / "base.log")

    out = work / "run"
    stages = {
        "fetch": ["--out", f"{out}/data/raw"],
        "format": ["--raw", f"{out}/data/raw", "--out", f"{out}/data/formatted", "--metrics", f"{out}/format.json"],
        "contamination": ["--formatted", f"{out}/data/formatted", "--out", f"{out}/data/contamination",
                          "--metrics", f"{out}/contamination.json"],
        "tokenize": ["--base", str(base), "--formatted", f"{out}/data/formatted",
                     "--contamination", f"{out}/data/contamination", "--out", f"{out}/data/tokenized",
                     "--metrics", f"{out}/tokenize.json", "--detail", f"{out}/tokenize-detail.json"],
    }
    if args.code != REPO and not (code / "stages" / "contamination.py").exists():
        # A checkout from before the contamination stage: its tokenize takes no list.
        del stages["contamination"]
        stages["tokenize"] = [a for a in stages["tokenize"] if "contamination" not in a]
    if args.until:
        stages = dict(list(stages.items())[: list(stages).index(args.until) + 1])
    results = {}
    for name, stage_args in stages.items():
        results[name] = run_stage(name, ["--params", str(params_file), *stage_args], code, work / f"{name}.log")
        print(f"{name}: {results[name]}", file=sys.stderr)
    tokens = None
    if "tokenize" in results:
        tokenized = json.loads((out / "tokenize.json").read_text())
        tokens = sum(tokenized[split]["tokens"] for split in ("train", "val", "test"))
        wall, cpu = results["tokenize"]["wall_s"], results["tokenize"]["cpu_s"]
        results["tokenize"].update(tokens=tokens, tokens_per_s=round(tokens / wall),
                                   tokens_per_cpu_s=round(tokens / cpu))
    if "contamination" in results:
        checked = json.loads((out / "contamination.json").read_text())
        cost = results["contamination"]
        cost.update(rows_checked=checked["rows_checked"], rows_flagged=checked["rows_flagged"],
                    rows_per_cpu_s=round(checked["rows_checked"] / cost["cpu_s"]))
    rows_in = json.loads((out / "format.json").read_text()) if (out / "format.json").exists() else None
    done = {"raw": "fetch", "formatted": "format", "tokenized": "tokenize"}
    done = {folder for folder, stage in done.items() if stage in results}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=code, capture_output=True, text=True)
    record = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "code": commit.stdout.strip() or str(code),
              "rows": args.rows, "corpus_bytes": data.stat().st_size, "format": rows_in,
              "data_bytes": {name: sum(f.stat().st_size for f in (out / "data" / name).rglob("*") if f.is_file())
                             for name in ("raw", "formatted", "tokenized") if name in done},
              "stages": results}
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / f"{slug(record['machine'])}-{record['date']}-{args.name}.json"
    target.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    counted = f"{tokens:,}" if tokens else "no"
    print(f"{args.rows:,} rows, {data.stat().st_size / 1e6:.0f} MB of JSON Lines, {counted} tokens "
          f"({record['machine']['cores']} cores, {record['machine']['memory_gib']} GiB)")
    print(f"{'stage':10} {'wall':>8} {'CPU':>8} {'peak RSS':>10} {'load':>10}")
    for name, r in results.items():
        print(f"{name:10} {r['wall_s']:7.1f}s {r['cpu_s']:7.1f}s {r['peak_rss_mb']:8.0f} MB "
              f"{r['load_before']:4.1f}-{r['load_after']:<4.1f}")
    if tokens:
        print(f"tokenize: {results['tokenize']['tokens_per_s']:,} tokens/s, "
              f"{results['tokenize']['tokens_per_cpu_s']:,} tokens per CPU-second")
    if "contamination" in results:
        print(f"contamination: {results['contamination']['rows_per_cpu_s']:,} training rows per CPU-second")
    print(f"written to {target}")


if __name__ == "__main__":
    main()
