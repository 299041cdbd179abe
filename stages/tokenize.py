"""Stage tokenize: token ids and loss labels with the base model's tokenizer (section `tokenize`)."""

import argparse
import sys

from sabia_ift import stage
from sabia_ift.config import load_section
from sabia_ift.io import write_json
from sabia_ift.modeling import load_tokenizer, model_context_length, model_folder, resolve_base
from sabia_ift.data.tokenization import summary, tokenize


def main(args: argparse.Namespace) -> None:
    cfg = load_section("tokenize", args.params)
    folder = model_folder(resolve_base(args.base))
    metrics = tokenize(cfg, load_tokenizer(folder), model_context_length(folder), args.formatted, args.out)
    write_json(args.metrics, metrics)
    print(summary(metrics))


if __name__ == "__main__":
    sys.exit(stage.run(main, __doc__, "base", "formatted", "out", "metrics"))
