"""`sabia-ift`: the commands a user runs besides `dvc repro`.

    sabia-ift check-params [params.yaml]      validate every section, as the stages will
    sabia-ift check-params --explain [train]  what each key means
    sabia-ift preset NAME                     the `-S key=value` arguments of presets/NAME.yaml
    sabia-ift run-preset NAME [-- DVC-ARGS]   run them as a DVC experiment; params.yaml stays as it is
    sabia-ift generate "instrução" [--input]  answer with the tuned model (models/adapter)
    sabia-ift chat [--terminal]               base and tuned side by side in the browser (or the terminal)
    sabia-ift export [--merged OUT] [--gguf f16|q8_0 PATH] [--push-to-hub REPO]
                                              standalone merged model; one llama.cpp file; publish to the Hub
    sabia-ift report --base REV [--head REV]  what a change did to the tuned model, with significance
    sabia-ift make-sample OUT                 regenerate the bundled sample
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from .errors import SabiaError


def _check_params(args: argparse.Namespace) -> None:
    from .config import SECTIONS, describe_keys, load_section

    if args.explain is not None:
        if args.explain and args.explain not in SECTIONS:
            raise SabiaError(f"no section {args.explain}; sections: {', '.join(SECTIONS)}")
        rows = describe_keys(args.explain or None)
        width = max(len(key) for key, _ in rows)
        for key, text in rows:
            print(f"{key:<{width}}  {text}")
        return
    for section in SECTIONS:
        load_section(section, args.params)
    print(f"{args.params}: all sections valid")


def _preset(args: argparse.Namespace) -> None:
    from .presets import load_preset, set_args

    pairs = set_args(load_preset(args.name, args.params))
    print(" ".join(pairs) if args.one_line else "\n".join(f"{a} {b}" for a, b in zip(pairs[::2], pairs[1::2])))


def _run_preset(args: argparse.Namespace) -> None:
    from .presets import run_preset

    extra = args.dvc_args[1:] if args.dvc_args[:1] == ["--"] else args.dvc_args
    code = run_preset(args.name, args.params, extra)
    if code:
        raise SystemExit(code)


def in_repo(path: str) -> Path:
    """A relative path that is missing here, found from the repository root above (the folder with dvc.yaml)."""
    here = Path(path)
    if here.is_absolute() or here.exists():
        return here
    for folder in Path.cwd().parents:
        if (folder / "dvc.yaml").is_file():
            return folder / here if (folder / here).exists() else here
    return here


def _generate(args: argparse.Namespace) -> None:
    from .evaluation.generation import generate
    from .modeling import load_tuned, pick_device
    from .serve.chat import Settings, check_instruction
    from .template import build_prompt, encode_prompt

    # The checks `chat --terminal` makes, before a model is loaded.
    Settings(max_new_tokens=args.max_new_tokens)
    check_instruction(args.instruction)
    device = pick_device(args.device)
    tokenizer, model = load_tuned(in_repo(args.base), in_repo(args.adapter), device)
    prompt = encode_prompt(tokenizer, build_prompt(args.instruction, args.input))
    switch = model.disable_adapter() if args.base_model else contextlib.nullcontext()
    with switch:
        out = generate(model, tokenizer, [prompt], max_new_tokens=args.max_new_tokens, batch_size=1, device=device,
                       context_length=getattr(model.config, "max_position_embeddings", None))
    print(out[0].text)
    if not out[0].stopped:
        print(f"[stopped at max_new_tokens={args.max_new_tokens} without EOS]", file=sys.stderr)


def _settings(args: argparse.Namespace):
    from .serve.chat import Settings

    return Settings(sampling=args.sampling, temperature=args.temperature, top_p=args.top_p,
                    max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty,
                    seed=args.seed)


def _chat(args: argparse.Namespace) -> None:
    import os
    import subprocess
    from pathlib import Path

    if not args.terminal:
        import importlib.util

        from .errors import ConfigError
        from .serve import streamlit_command

        if importlib.util.find_spec("streamlit") is None:
            raise ConfigError("sabia-ift chat: the browser app needs streamlit: pip install 'sabia-ift[chat]' "
                              "(or chat in the terminal: sabia-ift chat --terminal)")

        env = {**os.environ, "SABIA_IFT_BASE": str(Path(args.base).resolve()),
               "SABIA_IFT_ADAPTER": str(Path(args.adapter).resolve()), "SABIA_IFT_DEVICE": args.device,
               "SABIA_IFT_METRICS": str(Path(args.metrics).resolve())}
        print(f"chat: http://{args.host}:{args.port} (Ctrl-C stops it)", file=sys.stderr)
        with contextlib.suppress(KeyboardInterrupt):
            subprocess.run(streamlit_command(args.host, args.port), env=env, check=False)
        return
    from .serve.chat import Chat, check_instruction
    from .serve.terminal import answer_to, repl

    settings = _settings(args)
    if args.instruction is not None:
        check_instruction(args.instruction)
    chat = Chat.load(args.base, args.adapter, args.device)
    which = ["base", "tuned"] if args.model == "both" else [args.model]
    if args.instruction is not None:
        answer_to(sys.stdout, chat, args.instruction, args.input, settings, which)
    else:
        repl(chat, settings, which, ask_input=args.ask_input)


def _export(args: argparse.Namespace) -> None:
    from .serve.export import export

    export(args.base, args.adapter, merged=args.merged, push_to=args.push_to_hub, dtype=args.dtype,
           device=args.device, overwrite=args.overwrite, prompts=args.prompts, check_prompts=args.check_prompts,
           private=not args.public, gguf=tuple(args.gguf) if args.gguf else None)


def _report(args: argparse.Namespace) -> None:
    from .report import build_report

    build_report(args)


def _make_sample(args: argparse.Namespace) -> None:
    from .toy.sample import main as sample_main

    sample_main([args.out, "--seed", str(args.seed)])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sabia-ift", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check-params", help="validate params.yaml")
    check.add_argument("params", nargs="?", default="params.yaml")
    check.add_argument("--explain", nargs="?", const="", metavar="SECTION",
                       help="print what each key (of SECTION, or all) means instead")
    check.set_defaults(func=_check_params)

    preset = sub.add_parser("preset", help="print a preset's differences from params.yaml as dvc -S arguments")
    preset.add_argument("name", help="a name under presets/ (sabia-7b) or a YAML file")
    preset.add_argument("--params", default="params.yaml")
    preset.add_argument("--one-line", action="store_true", help="one line, for $(...) in a shell")
    preset.set_defaults(func=_preset)

    run_p = sub.add_parser("run-preset", help="run a preset as a DVC experiment (dvc exp run --temp -S ...)")
    run_p.add_argument("name", help="a name under presets/ (sabia-7b) or a YAML file")
    run_p.add_argument("--params", default="params.yaml")
    run_p.add_argument("dvc_args", nargs=argparse.REMAINDER, help="passed on to dvc exp run (after --)")
    run_p.set_defaults(func=_run_preset)

    gen = sub.add_parser("generate", help="answer one instruction with the tuned model")
    gen.add_argument("instruction")
    gen.add_argument("--input", default="")
    gen.add_argument("--base", default="models/base")
    gen.add_argument("--adapter", default="models/adapter")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    gen.add_argument("--base-model", action="store_true", help="answer with the base model (adapter off)")
    gen.set_defaults(func=_generate)

    chat = sub.add_parser("chat", help="talk to base and tuned models: browser app, or --terminal")
    chat.add_argument("instruction", nargs="?", help="with --terminal: answer this one instruction and exit")
    chat.add_argument("--terminal", action="store_true", help="chat in the terminal instead of the browser")
    chat.add_argument("--host", default="127.0.0.1",
                      help="address the browser app listens on (default: this machine only)")
    chat.add_argument("--port", type=int, default=8501)
    chat.add_argument("--base", default="models/base")
    chat.add_argument("--adapter", default="models/adapter")
    chat.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    chat.add_argument("--metrics", default="metrics",
                      help="the browser app shows the adapter's training and evaluation numbers from here")
    term = chat.add_argument_group("terminal chat")
    term.add_argument("--model", default="tuned", choices=["tuned", "base", "both"])
    term.add_argument("--input", default="", help="the optional input of a one-shot instruction")
    term.add_argument("--ask-input", action="store_true", help="also ask for an input after each instruction")
    term.add_argument("--sampling", action="store_true", help="sample instead of greedy decoding")
    term.add_argument("--temperature", type=float, default=0.7)
    term.add_argument("--top-p", type=float, default=0.9)
    term.add_argument("--max-new-tokens", type=int, default=128)
    term.add_argument("--repetition-penalty", type=float, default=1.0)
    term.add_argument("--seed", type=int, default=0)
    chat.set_defaults(func=_chat)

    exp = sub.add_parser("export", help="merge the adapter into a standalone model and/or publish it")
    exp.add_argument("--base", default="models/base")
    exp.add_argument("--adapter", default="models/adapter")
    exp.add_argument("--merged", metavar="OUT",
                     help="write base + adapter merged into this new folder (such as models/merged)")
    exp.add_argument("--gguf", nargs=2, metavar=("TYPE", "PATH"),
                     help="write the merged model as one GGUF file for llama.cpp and Ollama: TYPE f16 or q8_0")
    exp.add_argument("--overwrite", action="store_true",
                     help="replace OUT (or the GGUF file) if it already exists (never a project folder)")
    exp.add_argument("--dtype", default="auto",
                     help="weights of the merged model: auto (default: the dtype the model is evaluated in "
                          "on --device), bf16, fp16, fp32")
    exp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                     help="where to merge and compare answers")
    exp.add_argument("--prompts", default="data/formatted/test.jsonl", metavar="FILE",
                     help="test rows whose greedy answers the merged and the evaluated model are compared on")
    exp.add_argument("--check-prompts", type=int, default=8, metavar="N",
                     help="how many of them (default 8; 0 skips the comparison)")
    exp.add_argument("--push-to-hub", metavar="REPO",
                     help="publish to this Hub repo (the merged model if --merged, else the adapter); "
                          "token from HF_TOKEN")
    exp.add_argument("--public", action="store_true", help="create the Hub repo public (default: private)")
    exp.set_defaults(func=_export)

    from .report import add_arguments

    rep = sub.add_parser("report", help="Markdown report comparing two revisions (for pull requests)")
    add_arguments(rep)
    rep.set_defaults(func=_report)

    sample = sub.add_parser("make-sample", help="regenerate the bundled sample data")
    sample.add_argument("out")
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(func=_make_sample)
    return p


def main(argv: list[str] | None = None) -> int:
    from .stage import quiet_libraries

    quiet_libraries()
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except SabiaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
