"""Chat: streamed answers are the evaluated answers, with their stop reason; the terminal chat prints them."""

from __future__ import annotations

import io

import pytest

from sabia_ift.errors import ConfigError
from sabia_ift.serve.chat import Chat, Settings, check_instruction
from sabia_ift.serve.terminal import repl


@pytest.fixture(scope="module")
def chat(tiny_base, tuned_adapter):
    return Chat.load(tiny_base, tuned_adapter, "cpu")


def test_streamed_greedy_answer_is_what_evaluation_generates(chat):
    from sabia_ift.evaluation.generation import generate

    stream = chat.stream("Quanto é 2 mais 2?", "", Settings(max_new_tokens=24), "tuned")
    pieces = list(stream)
    answer = stream.answer
    expected = generate(chat.model, chat.tokenizer, [chat.prompt_ids("Quanto é 2 mais 2?")], max_new_tokens=24,
                        batch_size=1, device="cpu")[0]
    assert "".join(pieces).strip() == answer.text == expected.text
    assert answer.stop_reason == "eos" and expected.stopped and answer.new_tokens == expected.new_tokens


def test_base_side_is_the_adapter_switched_off(chat):
    base = chat.answer("Quanto é 2 mais 2?", settings=Settings(max_new_tokens=12), which="base")
    assert base.stop_reason == "length" and base.new_tokens == 12
    # The switch is undone: the tuned side still stops.
    assert chat.answer("Quanto é 2 mais 2?", settings=Settings(max_new_tokens=12)).stop_reason == "eos"


def test_sampling_is_seeded(chat):
    settings = Settings(sampling=True, temperature=1.5, top_p=1.0, max_new_tokens=12, seed=3)
    first = chat.answer("Escreva uma frase.", settings=settings, which="base")
    assert chat.answer("Escreva uma frase.", settings=settings, which="base").text == first.text


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(sampling=True, temperature=0.0), dict(top_p=0.0),
                                 dict(repetition_penalty=0.0)])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ConfigError):
        Settings(**bad)


@pytest.mark.parametrize("text", ["", " \n\t ", "\u200b\u2060\ufeff", "\u200d \u200b"])
def test_an_instruction_of_nothing_visible_is_empty(text):
    """`.strip()` alone let zero-width characters through: the model answered a blank template."""
    with pytest.raises(ConfigError, match="the instruction is empty"):
        check_instruction(text)
    check_instruction("Qual é a capital do Ceará?\u200b")


def test_terminal_one_shot_streams_both_answers(tiny_base, tuned_adapter, capsys):
    from sabia_ift.cli import main

    assert main(["chat", "--terminal", "Quanto é 2 mais 2?", "--model", "both", "--base", str(tiny_base),
                 "--adapter", str(tuned_adapter), "--device", "cpu", "--max-new-tokens", "10"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("[base]\n") and "\n[tuned]\n" in out
    assert "[base: hit the max new tokens limit · 10 tokens" in out and "[tuned: stopped at EOS" in out


def test_terminal_loop_until_an_empty_line(chat):
    lines = iter(["Quanto é 1 mais 1?", "", "Traduza.", "bom dia", ""])
    out = io.StringIO()
    repl(chat, Settings(max_new_tokens=8), ["tuned"], ask_input=True, read=lambda _: next(lines), out=out)
    assert out.getvalue().count("[tuned: stopped at EOS") == 2
