"""The Alpaca-PT prompt template, character for character as in DESIGN.md.

Training and evaluation both build prompts here, so the model is asked at test
time exactly what it was taught. BOS and EOS are not part of these strings:
tokenization adds them as ids, so no tokenizer setting can drop or double them.
"""

from __future__ import annotations

from typing import Any

# Label of a position that carries no loss (the BOS and the prompt).
IGNORE_INDEX = -100

PROMPT_NO_INPUT = (
    "Abaixo está uma instrução que descreve uma tarefa. "
    "Escreva uma resposta que conclua adequadamente a solicitação.\n"
    "\n"
    "### Instrução:\n"
    "{instruction}\n"
    "\n"
    "### Resposta:\n"
)

PROMPT_WITH_INPUT = (
    "Abaixo está uma instrução que descreve uma tarefa, emparelhada com uma entrada "
    "que fornece mais contexto. Escreva uma resposta que conclua adequadamente a solicitação.\n"
    "\n"
    "### Instrução:\n"
    "{instruction}\n"
    "\n"
    "### Entrada:\n"
    "{input}\n"
    "\n"
    "### Resposta:\n"
)


def build_prompt(instruction: str, input: str = "") -> str:
    """The prompt the model continues; the response follows it directly."""
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def encode_text(tokenizer, text: str | list[str]) -> Any:
    """Token ids of plain text, one list per string when given a list.

    Text stays text: a literal `<s>`, `</s>` or `<unk>` in the data (HTML, code,
    an output that already ends in `</s>`) is split into ordinary pieces, never
    read as a special token. Otherwise a row about HTML's <s> tag would carry a
    BOS mid-prompt and a trained EOS mid-answer, teaching the model to stop
    early. The only BOS and EOS ids are the ones tokenization adds.
    """
    return encode_batch(tokenizer, text)["input_ids"]


def encode_batch(tokenizer, texts: str | list[str]) -> Any:
    """encode_text's whole BatchEncoding: the ids and, from a fast tokenizer, where each token came from."""
    return tokenizer(texts, add_special_tokens=False, split_special_tokens=True)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """BOS + prompt ids: what generation is fed, and how training's rows begin."""
    return [tokenizer.bos_token_id, *encode_text(tokenizer, prompt)]


# --- The same prompt as a chat template, for exported models ------------------------------------

# Where the model's answer begins: the generation prompt of the chat template.
RESPONSE_HEADER = "### Resposta:\n"
# Each message the template accepts, in words: its refusals name this convention.
CHAT_CONVENTION = ("one user message (the instruction in 'content', an optional input in 'input'), "
                   "optionally followed by the assistant's answer")


def _jinja_string(text: str) -> str:
    """A Jinja string literal of `text` (Jinja reads JSON's escapes)."""
    import json

    return json.dumps(text, ensure_ascii=False)


def _jinja_text(template: str, fields: dict[str, str]) -> str:
    """`template`'s literal text as Jinja string expressions, its {fields} as the given expressions.

    Literal text is written as quoted strings rather than raw template text, so
    the Jinja environment's block trimming can never eat one of its newlines.
    """
    import string

    out = []
    for literal, name, _, _ in string.Formatter().parse(template):
        if literal:
            out.append("{{ " + _jinja_string(literal) + " }}")
        if name is not None:
            out.append("{{ " + fields[name] + " }}")
    return "".join(out)


def chat_template(bos_separator: str = "") -> str:
    """The training prompt as a Jinja chat template (`tokenizer.apply_chat_template`).

    Messages: `[{"role": "user", "content": instruction, "input": input}]`
    (`input` optional); with `add_generation_prompt=True` it renders `<s>` +
    build_prompt(instruction, input), the prompt the model was trained and
    evaluated on. A following assistant message renders a whole training row,
    answer and `</s>`. Anything else (a system message, several turns) is
    refused: the model was tuned on single instructions.

    `bos_separator` goes between `<s>` and the prompt: see `chat_template_for`.
    """
    assert PROMPT_NO_INPUT.endswith(RESPONSE_HEADER) and PROMPT_WITH_INPUT.endswith(RESPONSE_HEADER)
    fields = {"instruction": "message['content']", "input": "message['input']"}
    header = len(RESPONSE_HEADER)
    refuse = "this model answers " + CHAT_CONVENTION
    return (
        "{%- if messages | length == 0 or messages | length > 2 or messages[0]['role'] != 'user'"
        " or (messages | length == 2 and messages[1]['role'] != 'assistant') %}"
        "{{ raise_exception(" + _jinja_string(refuse) + ") }}{% endif %}"
        "{%- set message = messages[0] %}"
        "{%- if message['content'] is not string %}"
        "{{ raise_exception(" + _jinja_string("the user message's content must be the instruction, as text") + ") }}"
        "{% endif %}"
        "{{ bos_token }}" + ("{{ " + _jinja_string(bos_separator) + " }}" if bos_separator else "")
        + "{%- if message['input'] is defined and message['input'] %}"
        + _jinja_text(PROMPT_WITH_INPUT[:-header], fields)
        + "{%- else %}" + _jinja_text(PROMPT_NO_INPUT[:-header], fields) + "{%- endif %}"
        "{%- if add_generation_prompt or messages | length == 2 %}" + _jinja_text(RESPONSE_HEADER, {}) + "{% endif %}"
        "{%- if messages | length == 2 %}{{ messages[1]['content'] + eos_token }}{% endif %}"
    )


def chat_template_for(tokenizer) -> str:
    """The chat template whose ids are exactly `encode_prompt`'s with this tokenizer.

    Training tokenizes the prompt as a string of its own, so sentencepiece marks
    its first word as a word start ("▁Abaixo"). In one string after `<s>`, a
    tokenizer whose pre-tokenizer marks only the string's first word (newer
    LLaMA conversions) would give "Abaixo" unmarked: that one needs the space
    the mark stands for written after `<s>` (then the rendered text is exactly
    `tokenizer.decode` of the training ids), while an older one marks every
    segment and needs nothing. Both are tried; the one that reproduces training
    is kept.
    """
    from .errors import ModelError

    probes = [("Quanto é 3 mais 4?", ""), ("Ordene as palavras.", "uva, abacaxi")]
    for separator in ("", " "):
        template = chat_template(separator)
        if all(_chat_ids(tokenizer, template, instruction, input)
               == encode_prompt(tokenizer, build_prompt(instruction, input)) for instruction, input in probes):
            return template
    raise ModelError("this tokenizer cannot render the training prompt as a chat template with the training "
                     "ids (BOS + prompt); the export would answer unlike the evaluated model")


def chat_messages(instruction: str, input: str = "") -> list[dict[str, str]]:
    """The messages `chat_template` expects for one instruction."""
    message = {"role": "user", "content": instruction}
    if input:
        message["input"] = input
    return [message]


def _chat_ids(tokenizer, template: str, instruction: str, input: str) -> list[int]:
    return tokenizer.apply_chat_template(chat_messages(instruction, input), chat_template=template,
                                         add_generation_prompt=True, tokenize=True, return_dict=False)
