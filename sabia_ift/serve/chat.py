"""Talking to the trained model: load once, stream an answer, say why it stopped.

The browser app and the terminal chat share this. Prompts are built by the
project's template and encoded exactly as training encoded them (BOS +
prompt ids), so the model is asked what it was taught. The base model is the
same weights with the adapter switched off, so one copy serves both sides.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import ConfigError
from ..modeling import load_tuned, pick_device
from ..template import build_prompt, encode_prompt
from ..text import normalize_text

Which = Literal["base", "tuned"]
StopReason = Literal["eos", "length"]


@dataclass(frozen=True)
class Settings:
    """Generation settings a user can change between questions."""

    sampling: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 128
    repetition_penalty: float = 1.0
    # Sampling draws from this seed, so the same question with the same settings gives the same answer.
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.sampling and self.temperature <= 0:
            raise ConfigError(f"temperature must be above 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be above 0, got {self.repetition_penalty}")

    def generation_config(self, tokenizer):
        from transformers import GenerationConfig

        sampled = {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p} if self.sampling \
            else {"do_sample": False}
        return GenerationConfig(
            **sampled, num_beams=1, max_new_tokens=self.max_new_tokens,
            repetition_penalty=self.repetition_penalty, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        )


def check_instruction(instruction: str) -> None:
    """Refuse an instruction with nothing to read: the model would answer a bare template."""
    # The format stage's normalisation, so what training would drop as empty is empty here too.
    if not normalize_text(instruction):
        raise ConfigError("the instruction is empty (nothing but spaces or invisible characters); "
                          "write a question or a task")


@dataclass(frozen=True)
class Answer:
    text: str
    # Generated tokens, the EOS included when there was one.
    new_tokens: int
    stop_reason: StopReason
    seconds: float

    def describe(self) -> str:
        why = "stopped at EOS" if self.stop_reason == "eos" else "hit the max new tokens limit"
        return f"{why} · {self.new_tokens} tokens · {self.seconds:.1f} s"


class Stream:
    """The text of one answer as it is generated; `answer` is set once the iteration ends."""

    def __init__(self, pieces: Iterator[str]) -> None:
        self._pieces = pieces
        self.answer: Answer | None = None

    def __iter__(self) -> Iterator[str]:
        yield from self._pieces


class Chat:
    """A tokenizer and a PeftModel, loaded once, answering one question at a time."""

    def __init__(self, tokenizer, model, device: str) -> None:
        self.tokenizer, self.model, self.device = tokenizer, model, device
        # One generation at a time: switching the adapter off for the base model
        # is a change to the shared model that a second caller must not see.
        self._lock = threading.Lock()
        model.eval()

    @classmethod
    def load(cls, base_dir: str | Path, adapter_dir: str | Path, device: str = "auto") -> Chat:
        device = pick_device(device)
        tokenizer, model = load_tuned(base_dir, adapter_dir, device)
        return cls(tokenizer, model, device)

    def prompt_ids(self, instruction: str, input: str = "") -> list[int]:
        return encode_prompt(self.tokenizer, build_prompt(instruction.strip(), input.strip()))

    def stream(self, instruction: str, input: str = "", settings: Settings = Settings(),
               which: Which = "tuned") -> Stream:
        """Start answering; iterate the result for text pieces as they come."""
        check_instruction(instruction)
        stream = Stream(iter(()))
        stream._pieces = self._run(stream, self.prompt_ids(instruction, input), settings, which)
        return stream

    def answer(self, instruction: str, input: str = "", settings: Settings = Settings(),
               which: Which = "tuned") -> Answer:
        stream = self.stream(instruction, input, settings, which)
        for _ in stream:
            pass
        assert stream.answer is not None
        return stream.answer

    def _run(self, stream: Stream, ids: list[int], settings: Settings, which: Which) -> Iterator[str]:
        import contextlib

        import torch
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict = {}

        def work() -> None:
            switch = self.model.disable_adapter() if which == "base" else contextlib.nullcontext()
            try:
                with self._lock, switch, torch.inference_mode():
                    if settings.sampling:
                        torch.manual_seed(settings.seed)
                    input_ids = torch.tensor([ids], device=self.device)
                    result["ids"] = self.model.generate(
                        input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                        generation_config=settings.generation_config(self.tokenizer), streamer=streamer,
                    )[0, len(ids):].tolist()
            except BaseException as exc:  # noqa: BLE001 - handed to the reading side
                result["error"] = exc
                streamer.end()

        start = time.perf_counter()
        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        yield from streamer
        thread.join()
        if "error" in result:
            raise result["error"]
        new = result["ids"]
        eos = self.tokenizer.eos_token_id
        stopped = eos in new
        if stopped:
            new = new[: new.index(eos)]
        stream.answer = Answer(
            text=self.tokenizer.decode(new, skip_special_tokens=True).strip(),
            new_tokens=len(new) + int(stopped),
            stop_reason="eos" if stopped else "length",
            seconds=time.perf_counter() - start,
        )
