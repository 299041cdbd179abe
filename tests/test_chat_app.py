"""The browser chat: Streamlit's AppTest for the logic, and one run in a real headless Chromium."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator

import pytest

from conftest import REPO
from sabia_ift.serve import chat_app_path

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture
def app(tiny_base, tuned_adapter, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("SABIA_IFT_BASE", str(tiny_base))
    monkeypatch.setenv("SABIA_IFT_ADAPTER", str(tuned_adapter))
    monkeypatch.setenv("SABIA_IFT_DEVICE", "cpu")
    at = AppTest.from_file(str(chat_app_path()), default_timeout=300)
    at.run()
    assert not at.exception and not at.error
    return at


def answers(at) -> dict[str, tuple[str, str]]:
    """Side -> (answer text, caption) of the last turn, as its two columns show them."""
    base, tuned = at.columns[-2], at.columns[-1]
    return {side: (col.code[0].value, col.caption[0].value) for side, col in (("base", base), ("tuned", tuned))}


def test_base_and_tuned_answer_side_by_side(app):
    app.text_area(key="instruction").input("Quanto é 7 mais 5?")
    app.number_input(key="max_new_tokens").set_value(24)
    app.button[0].click().run()
    assert not app.exception
    shown = answers(app)
    assert shown["base"][1].startswith("hit the max new tokens limit · 24 tokens")
    assert shown["tuned"][1].startswith("stopped at EOS")
    assert shown["base"][0] != shown["tuned"][0]


def test_answers_match_the_chat_library_and_survive_a_settings_change(app, tiny_base, tuned_adapter):
    from sabia_ift.serve.chat import Chat, Settings

    app.text_area(key="instruction").input("Resuma o texto.")
    app.text_area(key="input").input("O rio corre para o mar.")
    app.number_input(key="max_new_tokens").set_value(16)
    app.button[0].click().run()
    chat = Chat.load(tiny_base, tuned_adapter, "cpu")
    expected = chat.answer("Resuma o texto.", "O rio corre para o mar.", Settings(max_new_tokens=16), "tuned")
    assert answers(app)["tuned"][0] == (expected.text or "(no visible text)")
    # Changing a setting reruns the script; the last answers stay on screen until the next question.
    app.radio(key="mode").set_value("sampling").run()
    assert answers(app)["tuned"][0] == (expected.text or "(no visible text)")
    assert not app.slider(key="temperature").disabled


def test_history_keeps_each_turn_until_cleared(app):
    for question in ("Quanto é 7 mais 5?", "Qual é a capital do Ceará?"):
        app.text_area(key="instruction").input(question)
        app.number_input(key="max_new_tokens").set_value(8)
        app.button[0].click().run()
    assert not app.exception and len(app.columns) == 4  # two turns, two answers each
    app.toggle(key="show_prompt").set_value(True).run()
    assert "Qual é a capital do Ceará?" in app.code[-1].value or any(
        "Qual é a capital do Ceará?" in code.value for code in app.code)
    app.button(key="clear").click().run()
    assert not app.columns


@pytest.mark.parametrize("instruction", ["", " \u200b\u2060 "], ids=["empty", "invisible"])
def test_empty_instruction_is_a_warning_not_a_generation(app, instruction):
    app.text_area(key="instruction").input(instruction)
    app.button[0].click().run()
    assert not app.exception
    assert app.warning[0].value == "Write an instruction first."
    assert not app.columns  # no turn was added to the conversation


def test_missing_adapter_is_shown_as_one_clear_error(tiny_base, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("SABIA_IFT_BASE", str(tiny_base))
    monkeypatch.setenv("SABIA_IFT_ADAPTER", str(tmp_path / "nowhere"))
    at = AppTest.from_file(str(chat_app_path()), default_timeout=120).run()
    assert "no such adapter folder" in at.error[0].value and not at.exception


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the chat server exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.read().strip() == b"ok":
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the chat server did not answer on {url} within {timeout} s")


@contextlib.contextmanager
def in_browser(command: Callable[[int], list[str]], env: dict[str, str]) -> Iterator:
    """The app served by `command(port)`, open in headless Chromium: the selenium driver. Both end after."""
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        message = "Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(message + "; .ci/run installs them")
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(command(port), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**env, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"})
    driver = None
    try:
        wait_healthy(url, proc)
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1400,1000"):
            options.add_argument(arg)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        driver.get(url)
        yield driver
    finally:
        if driver is not None:
            driver.quit()
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def ask(driver, wait, instruction: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    box = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, 'textarea[aria-label="Instruction"]')))
    box.send_keys(instruction)
    driver.find_element(By.XPATH, "//button[.//p[text()='Answer']]").click()


def shown(driver, css: str) -> str | None:
    """The text of the first element `css` selects, whitespace collapsed; None when there is none."""
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, css)
    return " ".join(found[0].text.split()) if found else None


def test_chat_in_a_real_browser(tiny_base, tuned_adapter, tmp_path):
    """`sabia-ift chat` serves the app; headless Chromium asks a question and both answers arrive."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    command = [sys.executable, "-m", "sabia_ift.cli", "chat", "--base", str(tiny_base), "--adapter",
               str(tuned_adapter), "--device", "cpu", "--port"]
    with in_browser(lambda port: [*command, str(port)], dict(os.environ)) as driver:
        wait = WebDriverWait(driver, 300)
        ask(driver, wait, "Qual é a capital do Ceará?")

        def finished() -> dict[str, tuple[str, str]] | bool:
            """Side -> (answer, caption) once both sides of the first turn are drawn in the history."""
            found = {side: (shown(driver, f'.st-key-turn-0-{side} [data-testid="stCode"]'),
                            shown(driver, f'.st-key-turn-0-{side} [data-testid="stCaptionContainer"]'))
                     for side in ("base", "tuned")}
            return found if all(code and caption and "tokens" in caption for code, caption in found.values()) \
                else False

        # A caption can be on screen before its st.code beside it (the code block's renderer loads lazily,
        # slowly on a busy machine), so wait for both, on both sides.
        found = wait.until(lambda _: finished())
        text = {side: answer for side, (answer, _) in found.items()}
        base_caption, tuned_caption = found["base"][1], found["tuned"][1]
        driver.save_screenshot(str(tmp_path / "chat.png"))
        assert tuned_caption.startswith("stopped at EOS"), tuned_caption
        assert base_caption.startswith("hit the max new tokens limit"), base_caption
        assert text["base"] != text["tuned"]
        assert (tmp_path / "chat.png").stat().st_size > 10_000
        # client.toolbarMode = minimal: no Deploy button.
        assert not driver.find_elements(By.XPATH, "//*[normalize-space(text())='Deploy']")


# Seconds each generation step waits in the test's copy of the app: slow enough for a browser to see
# the answers half written and to press Stop in time, with no change to the app itself.
STEP_DELAY = 0.25
SLOW_APP = """\
import runpy
import time

from sabia_ift.serve import chat, chat_app_path

if not hasattr(chat, "unslowed_row_streamer"):  # Streamlit runs this script again on every click
    chat.unslowed_row_streamer = chat._row_streamer

    def slowed_row_streamer(*args):
        streamer = chat.unslowed_row_streamer(*args)
        put = streamer.put

        def slowed_put(value):
            time.sleep({delay})
            put(value)

        streamer.put = slowed_put
        return streamer

    chat._row_streamer = slowed_row_streamer
runpy.run_path(str(chat_app_path()), run_name="__main__")
"""


def test_both_answers_stream_at_once_stop_and_history_in_a_real_browser(tiny_base, tuned_adapter, tmp_path):
    """Both columns grow together; Stop ends both and keeps what was written; the history holds every turn
    until Clear. The app runs unchanged, its generation slowed down by a wrapper script."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from sabia_ift.serve import streamlit_command

    app = tmp_path / "slow_chat_app.py"
    app.write_text(SLOW_APP.format(delay=STEP_DELAY), encoding="utf-8")
    env = {**os.environ, "SABIA_IFT_BASE": str(tiny_base), "SABIA_IFT_ADAPTER": str(tuned_adapter),
           "SABIA_IFT_DEVICE": "cpu", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get(
               "PYTHONPATH")]))}
    with in_browser(lambda port: streamlit_command("127.0.0.1", port, app), env) as driver:
        wait = WebDriverWait(driver, 120, poll_frequency=0.05, ignored_exceptions=[StaleElementReferenceException])
        sides = ("base", "tuned")

        def click(css: str, by: str = By.CSS_SELECTOR) -> None:
            wait.until(lambda _: driver.find_element(by, css).click() or True)  # again if it was redrawn

        def decoding(mode: str) -> None:
            click(f"//*[contains(@class, 'st-key-mode')]//label[.//p[text()='{mode}']]", By.XPATH)

        def live() -> dict[str, str] | bool:
            text = {side: (shown(driver, f'.st-key-answer-{side} [data-testid="stText"]') or "")
                    .removesuffix("▌").strip() for side in sides}
            return text if all(text.values()) else False

        def turn(number: int) -> dict[str, tuple[str, str]] | bool:
            """Side -> (answer, caption) of a turn in the history, once both are there."""
            found = {side: (shown(driver, f'.st-key-turn-{number}-{side} [data-testid="stCode"]'),
                            shown(driver, f'.st-key-turn-{number}-{side} [data-testid="stCaptionContainer"]'))
                     for side in sides}
            return found if all(code and caption for code, caption in found.values()) else False

        # Seeded sampling: the tuned model's greedy answer is three tokens, gone before anyone could press
        # Stop; this draw writes dozens.
        decoding("sampling")
        ask(driver, wait, "Qual é a capital do Ceará?")
        partial = wait.until(lambda _: live())  # both columns have text, and the Stop button is still up
        click(".st-key-stop button")
        stopped = wait.until(lambda _: turn(0))
        for side in sides:
            answer, caption = stopped[side]
            # Neither side had ended (not at EOS, not at the 128-token limit): they were written together.
            assert caption.startswith("stopped by you"), (side, caption)
            assert answer.startswith(partial[side]), (side, answer, partial[side])
        # Ready again: no Stop button, no answer still being written, and the kept text grows no more.
        wait.until(lambda _: not driver.find_elements(By.CSS_SELECTOR, ".st-key-stop, .st-key-answer-base"))
        for _ in range(2):
            time.sleep(4 * STEP_DELAY)
            assert turn(0) == stopped

        # Greedy again, and short, for a second turn that ends on its own.
        decoding("greedy")
        field = wait.until(lambda _: driver.find_element(By.CSS_SELECTOR, 'input[aria-label="Max new tokens"]'))
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys("6", Keys.ENTER)
        ask(driver, wait, "Quanto é 7 mais 5?")
        second = wait.until(lambda _: turn(1))
        assert second["base"][1].startswith("hit the max new tokens limit · 6 tokens"), second
        assert second["tuned"][1].startswith("stopped at EOS"), second
        assert turn(0) == stopped
        assert "Qual é a capital do Ceará?" in shown(driver, ".st-key-turn-0")
        assert "Quanto é 7 mais 5?" in shown(driver, ".st-key-turn-1")
        driver.save_screenshot(str(tmp_path / "history.png"))

        click(".st-key-clear button")
        wait.until(lambda _: not driver.find_elements(By.CSS_SELECTOR, ".st-key-turn-0, .st-key-turn-1"))
