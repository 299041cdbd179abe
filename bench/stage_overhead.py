"""Where the base model's evaluation stages spend the time that is not their model's work, on one
CUDA card, and what loading the base from a saved 4-bit copy would save.

    python bench/stage_overhead.py --rows .bench/rows.jsonl --tokenizer .bench/tokenizer \
        --pt-eval ../shared/pt-eval --work /tmp/bench --out bench/results [--limit 40] [--samples 64] \
        [--compare OTHER_CHECKOUT] [--profile] [--no-saved-copy]

The experiment of bench/experiment_stages.py (random LLaMA-7B, Sabiá-7B preset,
realistic rows, local leaderboard files) up to tokenize, then evaluate_base (on
--samples test prompts) and benchmark_base (--limit examples a task), each its
stage script in a process of its own, as dvc.yaml runs it. Each stage's log
lines say how far into the process they came, so the log (kept in the .txt
results file) shows where the time went; the JSON has each stage's wall time.
With --compare, the same two stages run again from another checkout of the
project (its `stages` and `sabia_ift`), in the same invocation, for a before
and after; an untimed evaluate_base runs first, so that the first timed stage
does not pay alone for compiling kernels and filling caches. With --profile,
each stage runs under cProfile instead (its table in the .txt file;
cProfile's hook is lost once CUDA work starts in some stages, so the outer
functions' times are missing there). Then, in this process: the
base loaded in 4-bit from its bf16 files, that model saved with
save_pretrained, the saved copy loaded back, and a check that it holds the same
4-bit weights.

Writes <out>/<card>-<date>-stage-overhead.json and ...-stage-overhead.txt.
"""

from __future__ import annotations

import io
import json
import os
import pstats
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))
from experiment_stages import (  # noqa: E402
    benchmark_base_cli,
    data_stages,
    evaluate_base_cli,
    experiment_arguments,
    experiment_params,
    experiment_paths,
)
from gpu_qlora import stage  # noqa: E402


def profile_table(prof: Path) -> str:
    text = io.StringIO()
    pstats.Stats(str(prof), stream=text).sort_stats("cumulative").print_stats(r"sabia_ift|transformers|peft|lm_eval"
                                                                               r"|bitsandbytes|datasets|evaluate", 45)
    return text.getvalue()


def run_stage(name: str, params: Path, work: Path, code: Path, profile: bool, *cli: str) -> tuple[float, str]:
    """The stage script from checkout `code`; its wall time and its output (or cProfile's table)."""
    prof = work / f"{name}.prof"
    trace = ["-m", "cProfile", "-o", str(prof)] if profile else []
    cmd = [sys.executable, *trace, "-m", f"stages.{name}", "--params", str(params), *cli]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=code, capture_output=True, text=True)
    wall = round(time.perf_counter() - start, 1)
    if done.returncode != 0:
        raise SystemExit(f"stage {name} from {code} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    if profile:
        return wall, profile_table(prof)
    # Stage log lines start with their time into the stage, right-aligned: keep every line but
    # the libraries' Python warnings and the source lines they quote.
    lines = [line for line in (done.stdout + done.stderr).splitlines()
             if line.strip() and "Warning" not in line and not line.startswith("    ")]
    return wall, "\n".join(lines)


def saved_4bit(model_dir: Path, copy_dir: Path, train: dict) -> dict:
    """Seconds to load the base in 4-bit from its bf16 files, to save that model, to load the
    saved copy; and whether the copy's 4-bit weights are the same bytes."""
    import shutil

    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM

    from sabia_ift.modeling import load_model, pick_dtype

    def timed(fn):
        torch.cuda.synchronize()
        start = time.perf_counter()
        value = fn()
        torch.cuda.synchronize()
        return value, round(time.perf_counter() - start, 2)

    kwargs = dict(quantization=train["quantization"], double_quant=train["double_quant"],
                  dtype=pick_dtype(train["precision"], "cuda"), device="cuda")
    model, from_bf16 = timed(lambda: load_model(model_dir, **kwargs))
    shutil.rmtree(copy_dir, ignore_errors=True)
    _, save_s = timed(lambda: model.save_pretrained(str(copy_dir)))
    size = sum(f.stat().st_size for f in copy_dir.iterdir())
    reloaded, from_copy = timed(lambda: AutoModelForCausalLM.from_pretrained(
        str(copy_dir), device_map={"": torch.cuda.current_device()}))
    layers, same = 0, True
    theirs = dict(reloaded.named_modules())
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            other = theirs[name]
            layers += 1
            same &= torch.equal(module.weight.data, other.weight.data)
            same &= torch.equal(bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state),
                                bnb.functional.dequantize_4bit(other.weight.data, other.weight.quant_state))
    reloaded_params = dict(reloaded.named_parameters())
    for name, param in model.named_parameters():
        if param.dtype.is_floating_point:
            same &= torch.equal(param, reloaded_params[name])
    return {"load_4bit_from_bf16_files_s": from_bf16, "save_4bit_s": save_s, "saved_4bit_gb": round(size / 1e9, 2),
            "load_saved_4bit_s": from_copy, "linear4bit_layers_compared": layers, "same_weights": bool(same)}


def main() -> None:
    p = experiment_arguments(__doc__)
    p.add_argument("--samples", type=int, default=64, help="evaluate_base's test prompts")
    p.add_argument("--compare", type=Path, help="another checkout whose stages run too, for a before and after")
    p.add_argument("--profile", action="store_true", help="run each stage under cProfile")
    p.add_argument("--no-saved-copy", action="store_true", help="skip the saved 4-bit copy's timings")
    args = p.parse_args()

    import torch
    import yaml

    work = args.work / "overhead"
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name(0)
    stem = f"{card.replace(' ', '-').lower()}-{time.strftime('%Y-%m-%d')}-stage-overhead"
    log = args.out / "stage-overhead.log"
    params = experiment_params(args, work, "first", {"evaluate": {"max_samples": args.samples}})
    paths = experiment_paths(work)
    if not (paths["tokenized"] / "dataset_dict.json").is_file():
        for name, *cli in data_stages(paths, work):
            stage(name, params, work, *cli, log=log)

    result: dict = {"card": card, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                    "limit": args.limit, "samples": args.samples, "stages": {}}
    path = args.out / f"{stem}.json"
    tables = []
    # The first stage on a fresh machine also compiles the Triton kernels and fills the page
    # cache and evaluate's module cache; untimed, so that neither checkout's rows pay for it.
    run_stage("evaluate_base", params, work, REPO, False, *evaluate_base_cli(paths, work / "eval-base-warm"))
    checkouts = {"this": REPO, **({"compared": args.compare.resolve()} if args.compare else {})}
    for label, code in checkouts.items():
        for name, cli in (
            ("evaluate_base", evaluate_base_cli(paths, work / f"eval-base-{label}")),
            ("benchmark_base", benchmark_base_cli(paths, work / f"benchmark-base-{label}.json")),
        ):
            wall, text = run_stage(name, params, work, code, args.profile, *cli)
            result["stages"].setdefault(label, {"code": str(code)})[name] = wall
            tables.append(f"=== {name} from {code}: {wall} s wall\n{text}")
            path.write_text(json.dumps(result, indent=2))
            print(label, name, wall, flush=True)

    if not args.no_saved_copy:
        train = yaml.safe_load(params.read_text())["train"]
        result["saved_4bit"] = saved_4bit(args.work / "llama-7b-random", work / "base-4bit", train)
        print(json.dumps(result["saved_4bit"]), flush=True)
    path.write_text(json.dumps(result, indent=2))
    (args.out / f"{stem}.txt").write_text("\n".join(tables))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
