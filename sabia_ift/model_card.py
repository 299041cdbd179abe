"""Model cards and the files that make an adapter folder usable anywhere.

A card says what the weights are: the base model and its revision, the data
and its revision, the exact prompt template, the training parameters and the
measured metrics. The train stage writes a first card into models/adapter
(with the tokenizer, so the folder stands alone); `sabia-ift export` writes the
full one, with the data manifest and metrics/*.json, next to a merged model or
into the adapter it publishes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .io import write_text
from .template import PROMPT_NO_INPUT, PROMPT_WITH_INPUT

CARD = "README.md"
Kind = Literal["adapter", "merged"]
# Metrics shown in the card's table, in this order, when metrics/eval.json has them.
EVAL_COLUMNS = ("eos_stop_rate", "repetition", "rougeL", "chrf", "exact_match", "mean_new_tokens", "val_loss")


@dataclass(frozen=True)
class CardFacts:
    base_name: str
    base_revision: str | None
    # A Hub id loads from anywhere; a local folder only where it exists.
    base_is_hub: bool
    train_params: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def gather(base: dict[str, Any], *, params: str | Path | None = "params.yaml",
           manifest: str | Path | None = "data/raw/manifest.json",
           metrics_dir: str | Path | None = "metrics") -> CardFacts:
    """What a project checkout knows about its run; missing files leave their part of the card out.

    `base` is what the adapter records of its base: {"name_or_path", "revision"}.
    """
    from .config import read_params

    train_params = None
    if params is not None and Path(params).is_file():
        train_params = read_params(params).get("train")
    metrics = {}
    if metrics_dir is not None and Path(metrics_dir).is_dir():
        for path in sorted(Path(metrics_dir).glob("*.json")):
            content = _read_json(path)
            if content is not None:
                metrics[path.stem] = content
    revision = base.get("revision")
    return CardFacts(
        base_name=str(base["name_or_path"]), base_revision=revision, base_is_hub=revision is not None,
        train_params=train_params, data=_read_json(Path(manifest)) if manifest is not None else None,
        metrics=metrics,
    )


def _load_snippet(kind: Kind, facts: CardFacts, repo_id: str | None) -> str:
    if kind == "merged":
        where = repo_id or "path/to/this/folder"
        return (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'tokenizer = AutoTokenizer.from_pretrained("{where}")\n'
            f'model = AutoModelForCausalLM.from_pretrained("{where}", dtype="auto")  # on a GPU: device_map="auto"'
        )
    adapter = repo_id or "path/to/models/adapter"
    if facts.base_is_hub:
        return (
            "from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
            f'model = AutoPeftModelForCausalLM.from_pretrained("{adapter}")  '
            f"# loads {facts.base_name} at the revision the adapter names\n"
            f'tokenizer = AutoTokenizer.from_pretrained("{adapter}")'
        )
    # A local base is named by the path it had in training (relative for the
    # tiny default), so the line names it by absolute path.
    base_path = facts.base_name if Path(facts.base_name).is_absolute() else f"/absolute/path/to/{facts.base_name}"
    return (
        "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'base = AutoModelForCausalLM.from_pretrained("{base_path}")\n'
        f'model = PeftModel.from_pretrained(base, "{adapter}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{adapter}")'
    )


# Greedy, at most 128 new tokens: what `sabia-ift generate` answers with its defaults. The
# tokenizer's chat template (template.chat_template) writes the one BOS and the training prompt.
GENERATE_SNIPPET = """

# The instruction goes in "content"; an input, if any, in "input" (the prompt's "### Entrada:" block).
messages = [{"role": "user", "content": "Quanto é 3 mais 4?", "input": ""}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                       return_tensors="pt", sanitize_control_tokens=True).to(model.device)
output = model.generate(**inputs, max_new_tokens=128, do_sample=False)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())"""

ASK_WITH_CHAT_TEMPLATE = (
    "The tokenizer's chat template writes the prompt below with one `<s>` (BOS) before it: exactly the token "
    "ids the model was trained and evaluated on, so add no BOS of your own and do not write `<s>` into the "
    "text. It takes one user message, the instruction in `content` and an optional input in `input`; a system "
    "message or several turns are refused, as the model was tuned on single instructions. With "
    "`sanitize_control_tokens=True` a literal `<s>` or `</s>` in your text stays text, as it did in training. "
    "The answer ends with `</s>` (EOS), where generation stops; these greedy lines answer as `sabia-ift "
    "generate` does."
)
ASK_BY_HAND = (
    "Ask it exactly as it was trained: one BOS id, then the prompt below with `{instruction}` (and `{input}`) "
    "filled in, tokenized without special tokens: "
    "`[tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)[\"input_ids\"]`. The prompt "
    "holds no `<s>`: do not write one into it, nor let the tokenizer add a second. The answer ends with `</s>` "
    "(EOS), where generation stops. `sabia-ift export` adds a chat template that does this to the tokenizer "
    "it exports."
)


def _export_section(export: dict[str, Any]) -> list[str]:
    """How the merged weights were made and how closely they answer like the evaluated model."""
    asked = export.get("dtype_asked")
    why = (f" (`--dtype auto`: the dtype `sabia-ift generate` runs the adapter in on {export.get('device')})"
           if asked == "auto" else "")
    lines = [f"Weights in {export['dtype']}{why}, merged from the base loaded unquantised: a 4-bit base is "
             "dequantised first, never merged into 4-bit weights.", ""]
    agreement = export.get("agreement")
    if agreement is None:
        lines.append(f"Agreement with the evaluated model (the base with the adapter): {export.get('not_measured')}.")
    else:
        lines.append(
            f"Greedy answers of this model, asked as above (at most {agreement['max_new_tokens']} new tokens, on "
            f"{agreement['device']}), equal those of the evaluated model (the base with the adapter, loaded as "
            f"the evaluate stage loads it) on **{agreement['agreeing']} of {agreement['prompts']}** test prompts "
            f"({agreement['agreeing'] / agreement['prompts']:.0%}) of `{agreement['source']}`.")
    return lines


def _data_section(data: dict[str, Any] | None) -> list[str]:
    if not data:
        return ["Not in this card: `sabia-ift export` adds the data source and its revision "
                "(data/raw/manifest.json) after `dvc repro`."]
    if data.get("source") == "hub":
        lines = [f"- Dataset: `{data.get('dataset')}`, split `{data.get('split')}`, "
                 f"revision `{data.get('revision')}`"]
    else:
        lines = [f"- File: `{data.get('path')}` (sha256 `{data.get('sha256')}`)"]
    lines.append(f"- Rows: {data.get('rows_written')} of {data.get('rows_in_source')} "
                 f"(max_rows {data.get('max_rows')}, seed {data.get('seed')})")
    return lines


def _metrics_section(metrics: dict[str, Any]) -> list[str]:
    evaluation = metrics.get("eval")
    lines: list[str] = []
    if evaluation and "base" in evaluation and "tuned" in evaluation:
        columns = [c for c in EVAL_COLUMNS if c in evaluation["tuned"]]
        lines += [f"Greedy generation on {evaluation.get('samples')} held-out prompts, at most "
                  f"{evaluation.get('max_new_tokens')} new tokens (metrics/eval.json):", "",
                  "| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        for name in ("base", "tuned"):
            lines.append(f"| {name} | " + " | ".join(str(evaluation[name].get(c)) for c in columns) + " |")
        lines.append("")
    train = metrics.get("train")
    if train:
        keys = ("train_loss", "eval_loss", "eval_perplexity", "steps", "epochs", "trainable_params", "device")
        lines.append("Training (metrics/train.json): "
                     + ", ".join(f"{k} {train[k]}" for k in keys if train.get(k) is not None) + ".")
    others = sorted(set(metrics) - {"eval", "train"})
    if others:
        lines += ["", "Other recorded metrics:", "", "```json",
                  json.dumps({k: metrics[k] for k in others}, indent=2, ensure_ascii=False), "```"]
    return lines or ["Not in this card: `sabia-ift export` adds metrics/*.json after the evaluate stage has run."]


def render(facts: CardFacts, kind: Kind, *, repo_id: str | None = None, chat: bool = False,
           export: dict[str, Any] | None = None) -> str:
    """The README.md of an adapter folder or a merged model.

    `chat`: the folder's tokenizer carries the training prompt as its chat
    template. `export`: how `sabia-ift export` merged it (dtype, agreement).
    """
    front = {
        "language": ["pt"],
        "library_name": "peft" if kind == "adapter" else "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["instruction-tuning", "lora", "alpaca", "portuguese", "sabia-ift"],
    }
    if facts.base_is_hub:
        front["base_model"] = facts.base_name
    what = ("A LoRA adapter" if kind == "adapter"
            else "A standalone model: the LoRA adapter merged into the base weights")
    revision = f" at revision `{facts.base_revision}`" if facts.base_revision else " (a local folder)"
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(), "---", "",
        f"# {facts.base_name.rsplit('/', 1)[-1]}, instruction-tuned (sabia-ift)", "",
        f"{what} for `{facts.base_name}`{revision}, instruction-tuned on Portuguese "
        "Alpaca-format data by the sabia-ift pipeline.", "",
        "## Use", "", "```python", _load_snippet(kind, facts, repo_id) + (GENERATE_SNIPPET if chat else ""), "```",
        "", ASK_WITH_CHAT_TEMPLATE if chat else ASK_BY_HAND, "",
        "## Prompt template", "", "Without input:", "", "```", PROMPT_NO_INPUT + "{output}</s>", "```", "",
        "With input:", "", "```", PROMPT_WITH_INPUT + "{output}</s>", "```", "",
        "## Training data", "", *_data_section(facts.data), "",
        "## Training parameters", "",
    ]
    if facts.train_params:
        lines += ["The `train` section of params.yaml:", "", "```yaml",
                  yaml.safe_dump(facts.train_params, sort_keys=False, allow_unicode=True).strip(), "```"]
    else:
        lines.append("Not in this card (params.yaml was not found when it was written).")
    lines += ["", "## Metrics", "", *_metrics_section(facts.metrics), ""]
    if export is not None:
        lines += ["## This export", "", *_export_section(export), ""]
    return "\n".join(lines)


def write_card(folder: str | Path, facts: CardFacts, kind: Kind, *, repo_id: str | None = None, chat: bool = False,
               export: dict[str, Any] | None = None) -> Path:
    path = Path(folder) / CARD
    write_text(path, render(facts, kind, repo_id=repo_id, chat=chat, export=export))
    return path


def save_adapter_extras(folder: str | Path, tokenizer, train_params: dict[str, Any],
                        base: dict[str, Any]) -> None:
    """Make a freshly saved adapter folder stand alone: its tokenizer and a card.

    For the train stage, right after `model.save_pretrained(folder)` (which
    writes PEFT's empty template card). Only what training itself knows goes
    in: data and metrics come later, from `sabia-ift export`.
    """
    tokenizer.save_pretrained(str(folder))
    facts = CardFacts(base_name=str(base["name_or_path"]), base_revision=base.get("revision"),
                      base_is_hub=base.get("revision") is not None, train_params=train_params)
    write_card(folder, facts, "adapter")
