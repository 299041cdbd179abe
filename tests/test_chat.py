"""Chat: streamed answers are the evaluated answers, with their stop reason; the terminal chat prints them."""

from __future__ import annotations

import io

import pytest

from sabia_ift.errors import ConfigError
from sabia_ift.serve.chat import Answer, Chat, Settings, check_instruction, describe_models
from sabia_ift.serve.terminal import history_file, line_editing, repl


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


def test_both_sides_at_once_give_what_each_gives_alone(chat):
    settings = Settings(max_new_tokens=20)
    pair = chat.stream_both("Quanto é 2 mais 2?", "", settings)
    seen = {"base": "", "tuned": ""}
    order = []
    for side, piece in pair:
        seen[side] += piece
        order.append(side)
    for side in ("base", "tuned"):
        alone = chat.answer("Quanto é 2 mais 2?", settings=settings, which=side)
        assert pair.answers[side] == Answer(alone.text, alone.new_tokens, alone.stop_reason, pair.answers[side].seconds)
        assert seen[side].strip() == alone.text
    # Interleaved, not one after the other: the base's text arrives before the tuned one is done.
    last_tuned = max(i for i, side in enumerate(order) if side == "tuned")
    assert "base" in order[:last_tuned]
    assert pair.answers["base"].stop_reason == "length" and pair.answers["tuned"].stop_reason == "eos"


def test_stop_ends_both_sides_and_keeps_their_text(chat):
    pair = chat.stream_both("Escreva uma história longa.", "", Settings(max_new_tokens=400))
    for pieces, _event in enumerate(pair, 1):
        if pieces == 6:
            pair.stop()
    answers = pair.answers
    assert answers["base"].stop_reason == "stopped" and 3 <= answers["base"].new_tokens < 400
    assert answers["base"].describe().startswith("stopped by you")


def test_a_single_stream_stops_too(chat):
    stream = chat.stream("Escreva uma história longa.", "", Settings(max_new_tokens=400), "base")
    for i, _piece in enumerate(stream):
        if i == 3:
            stream.stop()
    assert stream.answer.stop_reason == "stopped" and 4 <= stream.answer.new_tokens < 400


def test_a_reader_that_closes_a_pair_early_stops_the_generation(chat):
    pair = chat.stream_both("Escreva uma história longa.", "", Settings(max_new_tokens=400))
    next(iter(pair))
    pair.close()
    assert {a.stop_reason for a in pair.answers.values()} == {"stopped"}


def test_models_are_described_by_name_and_numbers_not_paths(tiny_base, tuned_adapter, tmp_path):
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    (metrics / "train.json").write_text('{"steps": 8, "epochs": 1.0, "train_rows": 256, "eval_loss": 1.5}')
    (metrics / "eval.json").write_text('{"samples": 16, "base": {"rougeL": 0.1, "chrf": 10.0, "eos_stop_rate": 0.0},'
                                       ' "tuned": {"rougeL": 0.3, "chrf": 20.0, "eos_stop_rate": 0.9}}')
    info = describe_models(tiny_base, tuned_adapter, metrics)
    assert info.base == "tiny test model (built by the base stage)" and info.adapter == tuned_adapter.name
    text = " ".join(info.details)
    assert str(tmp_path) not in text and str(tuned_adapter.parent) not in text
    assert "LoRA r=8, alpha=16 on down_proj, gate_proj" in text
    assert "trained 8 steps, 1.0 epochs on 256 rows; validation loss 1.5" in text
    assert "evaluation on 16 test prompts (base → tuned): rougeL 0.1 → 0.3; chrf 10.0 → 20.0" in text
    # No metrics folder: the adapter's own facts remain.
    assert len(describe_models(tiny_base, tuned_adapter, tmp_path / "none").details) == 2


def test_terminal_history_is_kept_across_sessions(tmp_path, monkeypatch):
    import readline

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = history_file()
    assert path == tmp_path / "sabia-ift" / "chat_history"
    readline.clear_history()
    save = line_editing(path)
    readline.add_history("Qual é a capital do Ceará?")
    save()
    readline.clear_history()
    line_editing(path)
    assert readline.get_history_item(readline.get_current_history_length()) == "Qual é a capital do Ceará?"
