"""The browser chat: Streamlit's AppTest for the logic, and one run in a real headless Chromium."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

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


def test_chat_in_a_real_browser(tiny_base, tuned_adapter, tmp_path):
    """`sabia-ift chat` serves the app; headless Chromium asks a question and both answers arrive."""
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        message = "Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(message + "; .ci/run installs them")
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sabia_ift.cli", "chat", "--base", str(tiny_base), "--adapter", str(tuned_adapter),
         "--device", "cpu", "--port", str(port)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"},
    )
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
        wait = WebDriverWait(driver, 300)
        box = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, 'textarea[aria-label="Instruction"]')))
        box.send_keys("Qual é a capital do Ceará?")
        driver.find_element(By.XPATH, "//button[.//p[text()='Answer']]").click()

        def caption(side: str):
            found = driver.find_elements(By.CSS_SELECTOR, f'.st-key-turn-0-{side} [data-testid="stCaptionContainer"]')
            return found[0].text if found and "tokens" in found[0].text else False

        # A finished turn moves to the history, captions and all: the tuned caption means both are done.
        tuned_caption = wait.until(lambda _: caption("tuned"))
        base_caption = caption("base")
        text = {side: driver.find_element(By.CSS_SELECTOR, f'.st-key-turn-0-{side} [data-testid="stCode"]').text
                for side in ("base", "tuned")}
        driver.save_screenshot(str(tmp_path / "chat.png"))
        assert tuned_caption.startswith("stopped at EOS"), tuned_caption
        assert base_caption.startswith("hit the max new tokens limit"), base_caption
        assert text["base"] != text["tuned"]
        assert (tmp_path / "chat.png").stat().st_size > 10_000
        # client.toolbarMode = minimal: no Deploy button.
        assert not driver.find_elements(By.XPATH, "//*[normalize-space(text())='Deploy']")
    finally:
        if driver is not None:
            driver.quit()
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
