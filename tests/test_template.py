"""The template must match DESIGN.md character for character."""

import re

import pytest

from conftest import SHARED
from sabia_ift.template import PROMPT_NO_INPUT, PROMPT_WITH_INPUT, build_prompt

# Written out literally (not built from the module) so a one-character edit fails here.
EXPECTED_NO_INPUT = (
    "Abaixo está uma instrução que descreve uma tarefa. Escreva uma resposta que conclua "
    "adequadamente a solicitação.\n\n### Instrução:\nQual é a capital do Ceará?\n\n### Resposta:\n"
)
EXPECTED_WITH_INPUT = (
    "Abaixo está uma instrução que descreve uma tarefa, emparelhada com uma entrada que fornece "
    "mais contexto. Escreva uma resposta que conclua adequadamente a solicitação.\n\n"
    "### Instrução:\nOrdene as palavras.\n\n### Entrada:\nuva, abacaxi\n\n### Resposta:\n"
)


def test_prompt_without_input_is_exact():
    assert build_prompt("Qual é a capital do Ceará?") == EXPECTED_NO_INPUT
    assert build_prompt("Qual é a capital do Ceará?", "") == EXPECTED_NO_INPUT


def test_prompt_with_input_is_exact():
    assert build_prompt("Ordene as palavras.", "uva, abacaxi") == EXPECTED_WITH_INPUT


def test_braces_in_user_text_are_kept_verbatim():
    assert "{x} {input}" in build_prompt("{x} {input}", "{instruction}")
    assert "### Entrada:\n{instruction}\n" in build_prompt("{x}", "{instruction}")


def _design_blocks() -> list[str]:
    text = (SHARED / "DESIGN.md").read_text(encoding="utf-8")
    blocks = []
    for match in re.finditer(r"\n\n((?:    .*\n|\n)+?)(?=\S)", text):
        lines = [line[4:] if line.startswith("    ") else line for line in match.group(1).split("\n")]
        block = "\n".join(lines).strip("\n")
        if block.startswith("Abaixo está"):
            blocks.append(block)
    return blocks


@pytest.mark.skipif(not (SHARED / "DESIGN.md").is_file(), reason="../shared/DESIGN.md not present")
def test_template_matches_design_document():
    blocks = _design_blocks()
    assert len(blocks) == 2
    no_input, with_input = sorted(blocks, key=len)
    # DESIGN.md shows the response and </s> after the prompt; the prompt is everything before them.
    assert no_input == PROMPT_NO_INPUT + "{output}</s>"
    assert with_input == PROMPT_WITH_INPUT + "{output}</s>"


def test_special_token_strings_in_text_stay_text(tokenizer):
    """`<s>`, `</s>` and `<unk>` written in the data are characters, not BOS, EOS or UNK."""
    from sabia_ift.template import encode_prompt, encode_text

    text = "Explique a tag <s> do HTML, o fim </s> e o <unk>."
    ids = encode_text(tokenizer, text)
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id}
    assert not special & set(ids)
    assert tokenizer.decode(ids) == text
    prompt = encode_prompt(tokenizer, build_prompt(text))
    assert prompt[0] == tokenizer.bos_token_id and prompt.count(tokenizer.bos_token_id) == 1
    assert tokenizer.eos_token_id not in prompt
    assert encode_text(tokenizer, [text, "x"])[0] == ids
