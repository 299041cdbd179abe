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
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """BOS + prompt ids: what generation is fed, and how training's rows begin."""
    return [tokenizer.bos_token_id, *encode_text(tokenizer, prompt)]
