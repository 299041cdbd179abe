"""The train stage on 1 and on 2 GPUs of one host, same params, same global batch.

    python bench/ddp.py --rows .bench/rows.jsonl --tokenizer .bench/tokenizer --work /tmp/bench --out DIR

Runs the real stage script (which relaunches itself under torchrun when
train.devices > 1) with the Sabiá-7B preset's fast settings on the random
LLaMA-7B folder and real Portuguese rows: packed micro-batches of 8,192
tokens, 2 micro-batches per optimizer step (1 GPU accumulates both, 2 GPUs
take one each). Writes <out>/<card>-<date>-ddp.json.

--checkpointing offload and --loss-weighting rows check those two under DDP
(same losses as one GPU accumulating); --tag names such a run's file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from gpu_qlora import build_model, prepare_data, stage, write_params  # noqa: E402
from side_by_side import FAST, LORA  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--checkpointing", choices=["off", "offload"], default="off")
    parser.add_argument("--loss-weighting", choices=["tokens", "rows"], default="tokens")
    parser.add_argument("--tag", default="ddp", help="suffix of the results file name")
    args = parser.parse_args()

    import torch

    work, out = args.work, args.out
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name(0)
    log = out / "ddp.log"
    model_dir = work / "llama-7b-random"
    build_model(model_dir, args.tokenizer)
    common = {
        "base": {"source": "pretrained", "name_or_path": str(model_dir)},
        "fetch": {"source": "file", "path": str(args.rows), "max_rows": None},
        "format": {"val_size": 16, "test_size": 16},
        "train": {**FAST, "gradient_checkpointing": args.checkpointing, "loss_weighting": args.loss_weighting,
                  "lora": LORA, "max_steps": args.steps + 2, "logging_steps": 1, "eval_steps": 100000,
                  "save_steps": 100000, "report_to": []},
    }
    params = write_params(work / "params.yaml", common)
    base, tokenized = prepare_data(params, work, log)

    result: dict = {"card": card, "gpus_visible": torch.cuda.device_count(), "date": time.strftime("%Y-%m-%d"),
                    "settings": common["train"], "runs": {}}
    for devices in (1, 2):
        name = f"{devices}gpu"
        run_params = write_params(work / f"params-{name}.yaml", {**common, "train": {**common["train"],
                                                                                     "devices": devices}})
        start = log.stat().st_size
        stage("train", run_params, work, "--base", str(base), "--data", str(tokenized), "--out",
              str(work / f"adapter-{name}"), "--checkpoints", str(work / f"ckpt-{name}"),
              "--metrics", str(work / f"m-{name}.json"), "--timings", str(work / f"t-{name}.json"), log=log)
        timings = json.loads((work / f"t-{name}.json").read_text())
        # The Trainer prints one {'loss': ...} line per step (logging_steps 1), the global mean over processes.
        with log.open() as fh:
            fh.seek(start)
            losses = [float(m) for m in re.findall(r"\{'loss': '([0-9.]+)'", fh.read())]
        result["runs"][name] = {**timings, "losses": losses}
        (out / f"{card.replace(' ', '-').lower()}-{time.strftime('%Y-%m-%d')}-{args.tag}.json").write_text(
            json.dumps(result, indent=2))
    one, two = result["runs"]["1gpu"], result["runs"]["2gpu"]
    result.update({"tokens_per_s_1gpu": one["steady_input_tokens_per_s"],
                   "tokens_per_s_2gpu": two["steady_input_tokens_per_s"],
                   "scaling": round(two["steady_input_tokens_per_s"] / one["steady_input_tokens_per_s"], 3),
                   "peak_memory_gib_per_rank": {"1gpu": one.get("peak_step_memory_gib"),
                                                 "2gpu": two.get("peak_step_memory_gib")}})
    (out / f"{card.replace(' ', '-').lower()}-{time.strftime('%Y-%m-%d')}-{args.tag}.json").write_text(
        json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    print("losses 1 GPU:", one["losses"][:6], "\nlosses 2 GPU:", two["losses"][:6])


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
