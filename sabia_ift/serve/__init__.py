"""Using what the pipeline trained: chat (browser and terminal), merge, export, publish."""

import sys
from pathlib import Path


def chat_app_path() -> Path:
    """The Streamlit script `sabia-ift chat` serves."""
    return Path(__file__).with_name("chat_app.py")


def streamlit_command(host: str, port: int, app: Path | None = None) -> list[str]:
    """How `sabia-ift chat` starts the browser app (`app`: another script, for tests)."""
    return [sys.executable, "-m", "streamlit", "run", str(app or chat_app_path()), "--server.address", host,
            "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
            # A chat, not a dashboard to publish: no Deploy button, no developer menu.
            "--client.toolbarMode", "minimal"]
