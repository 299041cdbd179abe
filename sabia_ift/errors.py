"""The one exception type users see: a message that names the file, row or key."""

from __future__ import annotations


class SabiaError(Exception):
    """A problem with the user's input or setup, reported without a traceback.

    Stage scripts turn it into a one-line message on stderr and exit code 2, so
    the message itself must say where the problem is (file, 1-based row, key)
    and, where it can, what to change.
    """


class ConfigError(SabiaError):
    """params.yaml holds an unknown key or a bad value."""


class DataError(SabiaError):
    """An input data file is malformed; the message names the file and row."""


class OutputError(SabiaError):
    """A stage output cannot be written: no permission, a read-only file system, a full disk."""


class ModelError(SabiaError):
    """A model, tokenizer or adapter cannot be loaded as configured."""


def hub_errors(*extra: type[Exception]) -> tuple[type[Exception], ...]:
    """What the Hugging Face libraries raise for a missing, gated or unreachable repo, a bad id or files.

    Missing files, HTTP errors and offline misses are OSError subclasses, bad ids
    ValueError; network failures come from the HTTP client huggingface_hub uses.
    Anything else is a bug and must not be reworded as the user's mistake;
    `extra` adds what one particular loader raises for bad files.
    """
    import httpx2

    return (OSError, ValueError, httpx2.HTTPError, *extra)
