"""Browser chat: the base model and the tuned one answer the same instruction side by side.

Started by `sabia-ift chat` (which runs `streamlit run` on this file); the
model folders come from the environment variables that command sets, so the
same file serves the CLI, `streamlit run` by hand, and Streamlit's AppTest.
"""

from __future__ import annotations

import os

import streamlit as st

from sabia_ift.errors import SabiaError
from sabia_ift.serve.chat import Answer, Chat, Settings
from sabia_ift.text import normalize_text

BASE_ENV, ADAPTER_ENV, DEVICE_ENV = "SABIA_IFT_BASE", "SABIA_IFT_ADAPTER", "SABIA_IFT_DEVICE"
SIDES = {"base": "Base model", "tuned": "Tuned (base + adapter)"}
CURSOR = "▌"


@st.cache_resource(show_spinner="Loading the model (once per server)…")
def load_chat(base: str, adapter: str, device: str) -> Chat:
    return Chat.load(base, adapter, device)


def sidebar_settings() -> Settings:
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
    return Settings(sampling=sampling, temperature=float(temperature), top_p=float(top_p),
                    max_new_tokens=int(max_new_tokens), repetition_penalty=float(repetition_penalty),
                    seed=int(seed))


def show_answer(answer: Answer) -> None:
    st.text(answer.text or "(no visible text)")
    st.caption(answer.describe())


def main() -> None:
    st.set_page_config(page_title="sabia-ift: base vs tuned", layout="wide")
    base = os.environ.get(BASE_ENV, "models/base")
    adapter = os.environ.get(ADAPTER_ENV, "models/adapter")
    device = os.environ.get(DEVICE_ENV, "auto")
    st.title("Base vs tuned")
    st.caption(f"base `{base}` · adapter `{adapter}` · prompts built with the training template")
    try:
        chat = load_chat(base, adapter, device)
    except SabiaError as exc:
        st.error(str(exc))
        st.stop()
    settings = sidebar_settings()

    with st.form("ask"):
        instruction = st.text_area("Instruction", key="instruction", placeholder="Qual é a capital do Ceará?")
        input_text = st.text_area("Input (optional)", key="input", height=80)
        submitted = st.form_submit_button("Answer", type="primary")

    if submitted and not normalize_text(instruction):  # what Chat.stream would refuse as empty
        st.warning("Write an instruction first.")
        submitted = False
    if submitted:
        st.session_state["answers"] = {}
    answers: dict[str, Answer] = st.session_state.get("answers", {})
    columns = st.columns(2)
    # Drawn one after the other: both sides share one model (the base is the adapter switched off).
    for which, column in zip(SIDES, columns):
        with column.container(key=f"answer-{which}", border=True):
            st.subheader(SIDES[which])
            if submitted:
                placeholder = st.empty()
                stream = chat.stream(instruction, input_text, settings, which)  # type: ignore[arg-type]
                text = ""
                for piece in stream:
                    text += piece
                    placeholder.text(text + CURSOR)
                placeholder.empty()
                answers[which] = stream.answer  # type: ignore[assignment]
            if which in answers:
                show_answer(answers[which])


main()
