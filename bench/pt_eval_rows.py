"""Alpaca-format rows with a realistic Portuguese length mix, from ../shared/pt-eval.

Benchmarks need rows whose prompt and response lengths look like real
instruction data, not 2,048-token random rows. This writes instruction/input/
output JSONL from public Portuguese sets (see ../shared/pt-eval/README.md):
FaQuAD questions with their paragraph as input (short answers), FaQuAD
paragraph continuations (long answers), and ENEM questions with their
alternatives (long prompts). The rows stay outside the repository.

    python bench/pt_eval_rows.py ../shared/pt-eval .bench/rows.jsonl [--paraphrases N]

With --paraphrases N, also the first N ASSIN 2 training pairs that entail each
other with a similarity of at least 4.5, as paraphrase requests (short prompts
and answers): 1,250 of them bring the set to about the 2,000 trained rows of a
preset-shaped experiment (bench/experiment_stages.py).
"""

from __future__ import annotations

import argparse
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path


def faquad_rows(path: Path) -> list[dict[str, str]]:
    rows = []
    data = json.loads(path.read_text(encoding="utf-8"))["data"]
    for article in data:
        for paragraph in article["paragraphs"]:
            context = paragraph["context"].strip()
            for qa in paragraph["qas"]:
                answer = max((a["text"] for a in qa["answers"]), key=len)
                rows.append({"instruction": qa["question"].strip(), "input": context, "output": answer.strip()})
            sentences = re.split(r"(?<=[.!?])\s+", context)
            if len(sentences) >= 4:
                cut = len(sentences) // 3
                rows.append({"instruction": "Continue o texto a seguir.", "input": " ".join(sentences[:cut]),
                             "output": " ".join(sentences[cut:])})
    return rows


def enem_rows(path: Path) -> list[dict[str, str]]:
    rows = []
    for q in json.loads(path.read_text(encoding="utf-8")):
        if q.get("IU") or not q.get("label") or len(q.get("options", [])) != 5:
            continue  # needs an image, or has no key
        letters = "ABCDE"
        options = "\n".join(f"{letter}) {text.strip()}" for letter, text in zip(letters, q["options"]))
        index = letters.lower().index(q["label"].lower())
        rows.append({
            "instruction": f"{q['question'].strip()}\n\n{options}",
            "input": (q.get("context") or "").strip(),
            "output": f"Alternativa {letters[index]}: {q['options'][index].strip()}",
        })
    return rows


def paraphrase_rows(path: Path, count: int) -> list[dict[str, str]]:
    rows = []
    for pair in ET.parse(path).getroot():
        if pair.get("entailment") == "Entailment" and float(pair.get("similarity", 0)) >= 4.5:
            rows.append({"instruction": "Reescreva a frase a seguir com outras palavras, sem mudar o sentido.",
                         "input": pair.findtext("t").strip(), "output": pair.findtext("h").strip()})
    if len(rows) < count:
        raise SystemExit(f"{path}: {len(rows)} paraphrase pairs, fewer than the {count} asked for")
    return rows[:count]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="the pt-eval folder")
    p.add_argument("out", type=Path)
    p.add_argument("--paraphrases", type=int, default=0)
    args = p.parse_args()
    source, out = args.source, args.out
    rows = faquad_rows(source / "faquad_train.json") + enem_rows(source / "enem2022.json")
    if args.paraphrases:
        rows += paraphrase_rows(source / "assin2-train-only.xml", args.paraphrases)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{len(rows)} rows -> {out}")


if __name__ == "__main__":
    main()
