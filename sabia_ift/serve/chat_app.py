"""Browser chat: the base model and the tuned one answer the same instruction side by side.

Started by `sabia-ift chat` (which runs `streamlit run` on this file); the
model folders come from the environment variables that command sets, so the
same file serves the CLI, `streamlit run` by hand, and Streamlit's AppTest.

Both answers stream at once (one batch of two rows, see chat.py). Each
question is answered on its own: the model was tuned on single-turn Alpaca
prompts, which have no place for earlier turns, and the evaluate stage
measures single turns, so earlier turns are shown, never sent. The
conversation lives in the browser session's state: a reload or "Clear"
empties it.

The page is drawn in fixed containers, history first, so what is already on
screen is redrawn at once on every run: nothing stays greyed out as stale, and
the streaming answer never appears twice.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import streamlit as st

from sabia_ift.errors import SabiaError
from sabia_ift.serve.chat import SIDES, Answer, Chat, PairStream, Settings, Which, describe_models
from sabia_ift.text import normalize_text

BASE_ENV, ADAPTER_ENV, DEVICE_ENV = "SABIA_IFT_BASE", "SABIA_IFT_ADAPTER", "SABIA_IFT_DEVICE"
METRICS_ENV = "SABIA_IFT_METRICS"
TITLES: dict[Which, str] = {"base": "Base model", "tuned": "Tuned (base + adapter)"}
CURSOR = "▌"
TURNS, ANSWERING = "turns", "answering"


@dataclass
class Turn:
    instruction: str
    input: str
    prompt: str
    settings: Settings
    answers: dict[Which, Answer] = field(default_factory=dict)


@st.cache_resource(show_spinner="Loading the model (once per server)…")
def load_chat(base: str, adapter: str, device: str) -> Chat:
    return Chat.load(base, adapter, device)


def sidebar_settings() -> tuple[Settings, bool]:
    with st.sidebar:
        st.header("Generation")
        mode = st.radio("Decoding", ["greedy", "sampling"], key="mode", horizontal=True)
        sampling = mode == "sampling"
        temperature = st.slider("Temperature", 0.05, 2.0, 0.7, 0.05, key="temperature", disabled=not sampling)
        top_p = st.slider("Top-p", 0.05, 1.0, 0.9, 0.05, key="top_p", disabled=not sampling)
        seed = st.number_input("Seed", 0, 2**31 - 1, 0, key="seed", disabled=not sampling)
        max_new_tokens = st.number_input("Max new tokens", 1, 4096, 128, key="max_new_tokens")
        repetition_penalty = st.slider("Repetition penalty", 1.0, 2.0, 1.0, 0.05, key="repetition_penalty")
        st.caption("Greedy decoding is what the evaluate stage measures.")
        show_prompt = st.toggle("Show prompt", key="show_prompt",
                                help="The exact text the model continues, built by the training template")
        st.button("Clear conversation", key="clear", on_click=lambda: st.session_state.update({TURNS: []}))
    settings = Settings(sampling=sampling, temperature=float(temperature), top_p=float(top_p),
                        max_new_tokens=int(max_new_tokens), repetition_penalty=float(repetition_penalty),
                        seed=int(seed))
    return settings, show_prompt


def show_models(base: str, adapter: str) -> None:
    try:
        info = describe_models(base, adapter, os.environ.get(METRICS_ENV, "metrics"))
    except SabiaError as exc:
        st.error(str(exc))
        st.stop()
    st.caption(f"**{info.base}** vs **{info.base} + adapter `{info.adapter}`**. Each question is answered "
               "on its own (the single-turn training template has no place for earlier turns); "
               "the conversation above it is for you to read.")
    if info.details:
        with st.expander("About the adapter"):
            st.markdown("\n".join(f"- {line}" for line in info.details))


def show_question(turn: Turn, show_prompt: bool) -> None:
    st.markdown(f"**You:** {turn.instruction}")
    if turn.input:
        st.markdown(f"**Input:** {turn.input}")
    if show_prompt:
        st.caption("Prompt: the model is given `<s>` and then exactly this text")
        st.code(turn.prompt, language=None, wrap_lines=True)


def show_turn(number: int, turn: Turn, show_prompt: bool) -> None:
    with st.container(key=f"turn-{number}", border=False):
        show_question(turn, show_prompt)
        for which, column in zip(SIDES, st.columns(2)):
            with column.container(key=f"turn-{number}-{which}", border=True):
                st.markdown(f"**{TITLES[which]}**")
                answer = turn.answers[which]
                # st.code: a copy button on hover, and the text exactly as generated.
                st.code(answer.text or "(no visible text)", language=None, wrap_lines=True)
                st.caption(answer.describe())


def answering() -> threading.Lock:
    """Held by the session's run that is answering, until its turn is in the history."""
    return st.session_state.setdefault(ANSWERING, threading.Lock())


def stream_turn(chat: Chat, turn: Turn, show_prompt: bool) -> None:
    """Draw both answers as they grow; keep the turn in the history however the run ends.

    A click anywhere (Stop among them) makes Streamlit end this run at its next
    draw call and start the next run at once, in another thread (runner.fastReruns);
    the `finally` then stops the generation and keeps what was written, marked as
    stopped, while the next run waits for it (see `main`).
    """
    # Taken now: in a run that a click ended, every Streamlit call, session state included, raises again.
    turns, lock = st.session_state.setdefault(TURNS, []), answering()
    with lock:
        show_question(turn, show_prompt)
        st.button("Stop", key="stop", help="Stop both answers here")
        places = {}
        for which, column in zip(SIDES, st.columns(2)):
            with column.container(key=f"answer-{which}", border=True):
                st.markdown(f"**{TITLES[which]}**")
                places[which] = st.empty()
        pair: PairStream = chat.stream_both(turn.instruction, turn.input, turn.settings)
        text: dict[Which, str] = {which: "" for which in SIDES}
        try:
            for which, piece in pair:
                text[which] += piece
                places[which].text(text[which] + CURSOR)
        finally:
            pair.close()
            if len(pair.answers) == len(SIDES):  # else generation failed, and its error is on its way up
                turn.answers = pair.answers
                turns.append(turn)


def main() -> None:
    st.set_page_config(page_title="sabia-ift: base vs tuned", layout="wide")
    base = os.environ.get(BASE_ENV, "models/base")
    adapter = os.environ.get(ADAPTER_ENV, "models/adapter")
    device = os.environ.get(DEVICE_ENV, "auto")
    st.title("Base vs tuned")
    show_models(base, adapter)
    try:
        chat = load_chat(base, adapter, device)
    except SabiaError as exc:
        st.error(str(exc))
        st.stop()
    settings, show_prompt = sidebar_settings()
    history, live, ask = st.container(), st.container(), st.container()

    with ask, st.form("ask", clear_on_submit=True, border=False):
        instruction = st.text_area("Instruction", key="instruction", placeholder="Qual é a capital do Ceará?")
        input_text = st.text_area("Input (optional)", key="input", height=80)
        submitted = st.form_submit_button("Answer", type="primary")
    if submitted and not normalize_text(instruction):  # what Chat.stream would refuse as empty
        with ask:
            st.warning("Write an instruction first.")
        submitted = False

    # A run that a click ended may still be keeping its turn: unwaited, the turn would show only after
    # the next click, and Stop would seem to throw the answers away.
    with answering():
        pass
    with history:
        for number, turn in enumerate(st.session_state.get(TURNS, [])):
            show_turn(number, turn, show_prompt)
    if submitted:
        turn = Turn(instruction.strip(), input_text.strip(), chat.prompt_text(instruction, input_text), settings)
        with live:
            stream_turn(chat, turn, show_prompt)
        # Drawn again from the history, where the next question's run will find it.
        st.rerun()


main()
