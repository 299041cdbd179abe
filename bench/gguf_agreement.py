"""How closely llama.cpp, reading the exported GGUF files, answers like the merged model it was written from.

    python bench/gguf_agreement.py [--base DIR --adapter DIR] [--prompts FILE] [--first 32] \
        [--max-new-tokens 128] [--work DIR] [--out bench/results]

Without --base/--adapter it builds what tests/test_gguf_file.py exports: the
tiny base (params.yaml's, pretrained on 200 documents for one epoch) and an
adapter trained on it just enough to stop at EOS (256 training rows, one
epoch, lr 3e-3, r 8 on every projection). Its rows come from the bundled
sample through the fetch and format stages' code with params.yaml's settings,
so the prompts asked (by default every row of that test split) were never
trained on.

Both files are written by `sabia-ift export`'s own code (sabia_ift.serve.export.export):
`--merged DIR --gguf f16 PATH`, then `--gguf q8_0 PATH`, each recording its own
agreement check (the CLI's default 8 prompts) in the file. Then every prompt is asked greedily, as the
export's check asks it: the merged model in transformers (CPU) gets the
training ids (sabia_ift.template), llama.cpp (llama-cpp-python, one thread,
CPU) gets the file's chat template rendered and tokenized by llama.cpp. Per
file type it reports the prompts, the share of identical answers (token for
token, prompt ids equal too), the share of identical tokens among the first
--first answer positions (the end of an answer counts as a token, so an answer
that stops early differs there), the mean length of the agreeing prefix, the
file size and llama.cpp's tokens/s on this CPU (answer tokens over the time of
prompt evaluation plus generation). The trained tiny model stops after a
couple of tokens, so every prompt is asked a second time with EOS never chosen
(both sides) for --first tokens: that shows how far the two agree beyond
the short answers.

Writes <out>/<machine>-<date>-gguf-agreement.json and prints the table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.data_scale import machine, slug  # noqa: E402

# Before anything loads torch: the merged model then computes as the tests' and the stages' do.
from sabia_ift import stage  # noqa: E402, F401
from sabia_ift.config import load_section, section_from_params  # noqa: E402
from sabia_ift.io import read_jsonl, write_json, write_jsonl  # noqa: E402

TYPES = ("f16", "q8_0")
# tests/conftest.py's tiny_base and tuned_adapter, so the numbers describe the model the tests export.
BASE_OVERRIDES = {"pretrain_documents": 200, "pretrain_epochs": 1}
TRAIN_OVERRIDES = {"epochs": 1, "lr": 3e-3, "logging_steps": 10, "eval_steps": 1000, "save_steps": 1000,
                   "report_to": [], "lora": {"r": 8, "alpha": 16, "dropout": 0.0,
                                             "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                "up_proj", "down_proj"]}}
TRAIN_ROWS, VAL_ROWS = 256, 16


def build(work: Path, params: Path, log) -> tuple[Path, Path, Path]:
    """A tiny base, an adapter trained on it, and the test split it never saw: (base, adapter, test.jsonl)."""
    from sabia_ift.data.formatting import format_rows
    from sabia_ift.data.sources import fetch
    from sabia_ift.data.tokenization import tokenize
    from sabia_ift.modeling import load_tokenizer
    from sabia_ift.toy.tiny_model import build_tiny_model
    from sabia_ift.train.training import train

    fetch_cfg = load_section("fetch", params)
    if fetch_cfg.source == "file" and not Path(fetch_cfg.path).is_absolute():
        fetch_cfg = fetch_cfg.model_copy(update={"path": str(REPO / fetch_cfg.path)})
    fetch(fetch_cfg, work / "raw")
    format_rows(load_section("format", params), work / "raw", work / "formatted")
    log("building the tiny base model")
    build_tiny_model(section_from_params("base", {"tiny": BASE_OVERRIDES}, params).tiny, work / "base")
    # The tests' adapter sees 256 rows: enough to stop at EOS, short enough to train in about 30 s.
    rows = work / "rows"
    write_jsonl(rows / "train.jsonl", read_jsonl(work / "formatted" / "train.jsonl")[:TRAIN_ROWS])
    write_jsonl(rows / "val.jsonl", read_jsonl(work / "formatted" / "val.jsonl")[:VAL_ROWS])
    write_jsonl(rows / "test.jsonl", read_jsonl(work / "formatted" / "test.jsonl"))
    tokenize(section_from_params("tokenize", {"max_length": 256}, params), load_tokenizer(work / "base"), 2048, rows,
             work / "tokenized")
    log(f"training the adapter on {TRAIN_ROWS} rows")
    train(section_from_params("train", TRAIN_OVERRIDES, params), work / "base", work / "tokenized",
          work / "adapter", work / "checkpoints", None)
    return work / "base", work / "adapter", work / "formatted" / "test.jsonl"


def compare(expected: list[int], got: list[int], eos: int, first: int) -> tuple[bool, int, int, int]:
    """(identical, agreeing prefix, equal positions among the first `first`, positions compared there)."""
    a, b = [*expected, eos], [*got, eos]
    prefix = 0
    while prefix < min(len(a), len(b)) and a[prefix] == b[prefix]:
        prefix += 1
    positions = min(first, max(len(a), len(b)))
    equal = sum(i < len(a) and i < len(b) and a[i] == b[i] for i in range(positions))
    # The prefix counts answer tokens: the shared EOS of two identical answers is not one.
    return a == b, min(prefix, len(expected), len(got)), equal, positions


def hf_continued(model, ids: list[int], tokens: int) -> list[int]:
    """The merged model's greedy `tokens` ids after `ids` with EOS never chosen."""
    import torch

    with torch.no_grad():
        output = model.generate(torch.tensor([ids], device=model.device), attention_mask=None, do_sample=False,
                                max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=model.config.eos_token_id)
    return output[0, len(ids):].tolist()


def llama_continued(llm, ids: list[int], tokens: int) -> list[int]:
    """LlamaCpp.greedy with EOS never chosen, as hf_continued asks the merged model."""
    import numpy as np
    from llama_cpp import LogitsProcessorList

    eos = llm.llm.token_eos()

    def no_eos(_, scores):
        scores[eos] = -np.inf
        return scores

    out: list[int] = []
    for token in llm.llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True,
                                  logits_processor=LogitsProcessorList([no_eos])):
        out.append(token)
        if len(out) == tokens:
            break
    return out


def summary(pairs: list[tuple[list[int], list[int]]], same_ids: list[bool], eos: int, first: int) -> dict:
    """The comparison of (reference, llama.cpp) answers; an answer to a prompt read differently never agrees."""
    counts = [compare(want, got, eos, first) for want, got in pairs]
    identical = sum(same and ids for (same, *_), ids in zip(counts, same_ids, strict=True))
    return {"identical_answers": identical, "identical_answer_share": round(identical / len(pairs), 4),
            f"identical_token_share_first_{first}": round(sum(c[2] for c in counts) / sum(c[3] for c in counts), 4),
            "mean_agreeing_prefix_tokens": round(sum(c[1] for c in counts) / len(pairs), 2),
            "mean_answer_tokens": round(sum(len(got) for _, got in pairs) / len(pairs), 2),
            "mean_reference_answer_tokens": round(sum(len(want) for want, _ in pairs) / len(pairs), 2)}


def timed(function, *args) -> tuple[list[int], float]:
    start = time.perf_counter()
    out = function(*args)
    return out, time.perf_counter() - start


def ask(files: dict[str, Path], merged: Path, rows: list[dict], max_new_tokens: int, first: int, log) -> dict:
    """Every prompt asked of the merged model and of llama.cpp on each file; the comparison per file type.

    Twice: as the export's check asks (stopping at EOS), and continued for `first` tokens with EOS never
    chosen, since the tiny model's answers end after a few tokens and would hide drift further on.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sabia_ift.serve import gguf_file
    from sabia_ift.template import build_prompt, chat_messages, encode_prompt

    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    eos = tokenizer.eos_token_id
    template = gguf_file.chat_template_for_gguf(merged, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(str(merged), dtype="auto")
    prompts = [(encode_prompt(tokenizer, build_prompt(r["instruction"], r.get("input") or "")),
                str(tokenizer.apply_chat_template(chat_messages(r["instruction"], r.get("input") or ""),
                                                  chat_template=template, add_generation_prompt=True,
                                                  tokenize=False))) for r in rows]
    log(f"merged model (transformers, CPU): {len(prompts)} prompts, to EOS and continued for {first} tokens")
    answers = [timed(gguf_file.hf_greedy, model, ids, eos, max_new_tokens) for ids, _ in prompts]
    continued = [timed(hf_continued, model, ids, first) for ids, _ in prompts]
    del model

    def speed(timings: list[tuple[list[int], float]]) -> dict:
        tokens, seconds = sum(len(t) for t, _ in timings), sum(s for _, s in timings)
        return {"answer_tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}

    results: dict = {"merged_model": {"dtype": gguf_file._dtype(merged), "threads": _torch_threads(),
                                      "to_eos": speed(answers), f"continued_{first}": speed(continued)}}
    context = max(len(ids) for ids, _ in prompts) + max(max_new_tokens, first) + 1
    for kind, path in files.items():
        log(f"llama.cpp ({kind}): {len(prompts)} prompts, to EOS and continued for {first} tokens")
        llm = gguf_file.LlamaCpp(path, context)
        asked = [llm.tokenize(text) for _, text in prompts]
        same_ids = [a == ids for a, (ids, _) in zip(asked, prompts, strict=True)]
        got = [timed(llm.greedy, a, max_new_tokens) for a in asked]
        got_continued = [timed(llama_continued, llm, a, first) for a in asked]
        del llm
        results[kind] = {
            "prompts": len(prompts), "prompt_ids_equal": sum(same_ids), "file_bytes": path.stat().st_size,
            "to_eos": {**summary([(w, g) for (w, _), (g, _) in zip(answers, got, strict=True)], same_ids, eos, first),
                       "llama_cpp": speed(got)},
            f"continued_{first}": {
                **summary([(w, g) for (w, _), (g, _) in zip(continued, got_continued, strict=True)], same_ids, eos,
                          first),
                "llama_cpp": speed(got_continued)},
            "recorded_in_file": gguf_file.read_agreement(path)}
    return results


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, help="tiny base folder (with --adapter); default: build one")
    parser.add_argument("--adapter", type=Path, help="adapter folder trained on --base")
    parser.add_argument("--prompts", type=Path, help="test rows (jsonl); default: the format stage's test split")
    parser.add_argument("--first", type=int, default=32, help="answer positions the token share compares")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="default: the export's check (sabia_ift.serve.export.MAX_NEW_TOKENS)")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--work", type=Path, help="where models and files go (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    if (args.base is None) != (args.adapter is None):
        parser.error("give --base and --adapter together, or neither")
    if args.base is not None and args.prompts is None:
        parser.error("--base/--adapter need --prompts (the test rows of the adapter's data)")

    import llama_cpp

    from sabia_ift.serve import gguf_file
    from sabia_ift.serve.export import MAX_NEW_TOKENS, export

    missing = gguf_file.llama_cpp_missing()
    if missing:
        sys.exit(missing)
    max_new_tokens = args.max_new_tokens or MAX_NEW_TOKENS

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    start, cpu, load = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="gguf-agreement-") as tmp:
        work = args.work or Path(tmp)
        if args.base is None:
            base, adapter, prompts = build(work, args.params, log)
        else:
            base, adapter, prompts = args.base, args.adapter, args.prompts
        prompts = args.prompts or prompts
        rows = read_jsonl(prompts)
        files = {kind: work / f"model.{kind}.gguf" for kind in TYPES}
        project = {"params": None, "manifest": None, "metrics_dir": None}
        # The same calls as `sabia-ift export --merged DIR --gguf f16 PATH` and `--gguf q8_0 PATH`: the
        # q8_0 file comes from its own merge in a temporary folder, as a user who asks for it alone gets it.
        export(base, adapter, merged=work / "merged", push_to=None, device="cpu", prompts=prompts,
               gguf=("f16", files["f16"]), log=log, **project)
        export(base, adapter, merged=None, push_to=None, device="cpu", prompts=prompts,
               gguf=("q8_0", files["q8_0"]), log=log, **project)
        results = ask(files, work / "merged", rows, max_new_tokens, args.first, log)
    record = {
        "machine": machine(), "date": time.strftime("%Y-%m-%d"),
        "wall_s": round(time.perf_counter() - start, 1), "cpu_s": round(time.process_time() - cpu, 1),
        # The machine is shared: a load above its core count means the speeds are low.
        "load_average": [round(load, 2), round(os.getloadavg()[0], 2)],
        "model": "tests' tiny base + tuned adapter (built here)" if args.base is None
        else {"base": str(args.base), "adapter": str(args.adapter)},
        "prompts": str(prompts.relative_to(work)) if prompts.is_relative_to(work) else str(prompts),
        "max_new_tokens": max_new_tokens, "first": args.first,
        "llama_cpp": {"llama_cpp_python": llama_cpp.__version__, "threads": 1, "device": "CPU"},
        "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / f"{slug(record['machine'])}-{record['date']}-gguf-agreement.json"
    write_json(target, record)
    continued = f"continued_{args.first}"
    print(f"{'':22} {'prompts':>7} {'identical':>10} {f'tokens, first {args.first}':>16} {'prefix':>7} "
          f"{'answer':>7} {'tokens/s':>9}")
    for kind in TYPES:
        for run in ("to_eos", continued):
            r = results[kind][run]
            print(f"{kind + ' ' + run:22} {results[kind]['prompts']:7} {100 * r['identical_answer_share']:9.1f}% "
                  f"{100 * r[f'identical_token_share_first_{args.first}']:15.1f}% "
                  f"{r['mean_agreeing_prefix_tokens']:7.1f} {r['mean_answer_tokens']:7.1f} "
                  f"{r['llama_cpp']['tokens_per_s']:9.0f}")
        print(f"{kind} file: {results[kind]['file_bytes'] / 2**20:.2f} MiB")
    hf = results["merged_model"]
    print(f"merged model (transformers): {hf['to_eos']['tokens_per_s']:.0f} tokens/s to EOS, "
          f"{hf[continued]['tokens_per_s']:.0f} continued")
    print(f"written to {target}")


if __name__ == "__main__":
    main()
