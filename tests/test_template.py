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


# --- The training prompt as a chat template (exported tokenizers) ----------------------------


def _training_row_ids(tokenizer, instruction: str, input: str, output: str) -> list[int]:
    from sabia_ift.template import encode_text

    return [tokenizer.bos_token_id, *encode_text(tokenizer, build_prompt(instruction, input) + output),
            tokenizer.eos_token_id]


def test_chat_template_renders_the_training_prompt_and_rows(tokenizer):
    from sabia_ift.template import chat_messages, chat_template_for, encode_prompt

    template = chat_template_for(tokenizer)
    for instruction, input in (("Qual é a capital do Ceará?", ""), ("Ordene as palavras.", "uva, abacaxi")):
        messages = chat_messages(instruction, input)
        text = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                             tokenize=False)
        ids = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        prompt = encode_prompt(tokenizer, build_prompt(instruction, input))
        assert ids == prompt and ids.count(tokenizer.bos_token_id) == 1
        # The text is what the training ids read as: `<s>`, then the prompt.
        assert text == tokenizer.decode(prompt) and text.endswith(build_prompt(instruction, input))
        # Without the generation prompt the answer header is left for the model's turn.
        bare = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
        assert text == bare + "### Resposta:\n"
        # With the answer: the whole training row, answer and EOS.
        row = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": "Fortaleza."}],
                                            chat_template=template, tokenize=True, return_dict=False)
        assert row == _training_row_ids(tokenizer, instruction, input, "Fortaleza.")


@pytest.mark.parametrize("messages", [
    [{"role": "system", "content": "Seja breve."}, {"role": "user", "content": "Oi"}],
    [{"role": "user", "content": "Oi"}, {"role": "assistant", "content": "Olá"}, {"role": "user", "content": "E?"}],
    [{"role": "assistant", "content": "Olá"}],
    [{"role": "user", "content": [{"type": "text", "text": "Oi"}]}],
], ids=["system", "two-turns", "no-user", "content-list"])
def test_chat_template_refuses_what_training_never_saw(tokenizer, messages):
    from jinja2.exceptions import TemplateError

    from sabia_ift.template import chat_template_for

    with pytest.raises(TemplateError, match="this model answers one user message|as text"):
        tokenizer.apply_chat_template(messages, chat_template=chat_template_for(tokenizer), tokenize=False)


@pytest.mark.parametrize(("prepend_scheme", "start"), [("first", "<s> Abaixo"), ("always", "<s>Abaixo")])
def test_chat_template_fits_how_the_tokenizer_marks_word_starts(tokenizer, prepend_scheme, start):
    """Newer LLaMA conversions mark only a string's first word as a word start, older ones every
    segment: the template writes the space after `<s>` only where that gives the training ids."""
    import copy

    from tokenizers.pre_tokenizers import Metaspace

    from sabia_ift.template import chat_messages, chat_template_for, encode_prompt

    other = copy.deepcopy(tokenizer)
    other.backend_tokenizer.pre_tokenizer = Metaspace(replacement="▁", prepend_scheme=prepend_scheme, split=False)
    template = chat_template_for(other)
    messages = chat_messages("Quanto é 3 mais 4?")
    assert other.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                     tokenize=False).startswith(start)
    assert other.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                     return_dict=False) == encode_prompt(other, build_prompt("Quanto é 3 mais 4?"))
