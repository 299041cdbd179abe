"""Using what the pipeline trained: chat (browser and terminal), merge, export, publish."""

from pathlib import Path


def chat_app_path() -> Path:
    """The Streamlit script `sabia-ift chat` serves."""
    return Path(__file__).with_name("chat_app.py")
