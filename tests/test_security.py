"""Security rules that are easy to break by accident: checked over the source tree."""

import re

from conftest import REPO

SOURCES = [p for folder in ("sabia_ift", "stages", "bench") for p in (REPO / folder).rglob("*.py")]


def test_the_tree_has_sources():
    assert len(SOURCES) > 10


def test_no_remote_code_is_ever_trusted():
    for path in SOURCES:
        assert not re.search(r"trust_remote_code\s*=\s*True", path.read_text()), path


def test_model_weights_load_from_safetensors_only():
    text = (REPO / "sabia_ift" / "modeling.py").read_text()
    assert '"use_safetensors": True' in text and '"trust_remote_code": False' in text
    for path in SOURCES:
        source = path.read_text()
        assert "torch.load(" not in source, path  # pickle can run code
        assert "use_safetensors=False" not in source and "safe_serialization=False" not in source, path


def test_no_server_binds_beyond_localhost():
    for path in SOURCES:
        assert "0.0.0.0" not in path.read_text(), path


def test_tokens_are_never_passed_explicitly():
    """A token is read by huggingface_hub from HF_TOKEN; code that passes one could also log it."""
    for path in SOURCES:
        assert not re.search(r"\btoken\s*=", path.read_text()), path
