"""Talking to the trained model: load once, stream an answer, say why it stopped.

The browser app and the terminal chat share this. Prompts are built by the
project's template and encoded exactly as training encoded them (BOS +
prompt ids), so the model is asked what it was taught. The base model is the
same weights with the adapter switched off, so one copy serves both sides; to
answer both at once they are one batch of two rows, the first row with the
adapter off (PEFT's mixed-adapter batch), so each token of both sides costs one
forward pass and the two texts grow together.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..artifacts import BaseInfo, TrainMeta
from ..errors import ConfigError, SabiaError
from ..modeling import load_tuned, pick_device
from ..template import build_prompt, encode_prompt
from ..text import normalize_text

Which = Literal["base", "tuned"]
StopReason = Literal["eos", "length", "stopped"]
SIDES: tuple[Which, Which] = ("base", "tuned")


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
        why = {"eos": "stopped at EOS", "length": "hit the max new tokens limit",
               "stopped": "stopped by you"}[self.stop_reason]
        return f"{why} · {self.new_tokens} tokens · {self.seconds:.1f} s"


class Stream:
    """The text of one answer as it is generated; `answer` is set once the iteration ends.

    `stop()` (from any thread) ends the generation at the next token; the
    answer so far is kept, with stop reason "stopped".
    """

    def __init__(self, pieces: Iterator[str]) -> None:
        self._pieces = pieces
        self.answer: Answer | None = None
        self.stop_flag = threading.Event()

    def stop(self) -> None:
        self.stop_flag.set()

    def __iter__(self) -> Iterator[str]:
        yield from self._pieces


class PairStream:
    """Both sides' answers to one prompt as they are generated, from one batch.

    Iterating gives (side, text piece) in the order the tokens come, the two
    sides interleaved; `answers` is filled once the iteration ends. `stop()`
    ends both at the next token. `close()` stops and waits, for a reader that
    leaves early.
    """

    def __init__(self) -> None:
        self.answers: dict[Which, Answer] = {}
        self.stop_flag = threading.Event()
        self._events: queue.Queue = queue.Queue()
        self._finish: Callable[[], None] = lambda: None
        self._done = False

    def stop(self) -> None:
        self.stop_flag.set()

    def __iter__(self) -> Iterator[tuple[Which, str]]:
        while (event := self._events.get()) is not None:
            yield event
        self._close()

    def close(self) -> None:
        self.stop()
        self._close()

    def _close(self) -> None:
        if not self._done:
            self._done = True
            self._finish()


def _stop_when(flag: threading.Event):
    """A stopping criterion that ends every row once `flag` is set."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Flagged(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), flag.is_set(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([Flagged()])


def _row_streamer(tokenizer, rows: tuple[Which, ...], events: queue.Queue):
    """A generate() streamer for a batch: each row's text, decoded as TextStreamer does, goes to `events`
    as (row name, piece); a row's text ends at its EOS (what follows is padding); None marks the end."""
    from transformers import TextStreamer
    from transformers.generation.streamers import BaseStreamer

    class Row(TextStreamer):
        def __init__(self, name: Which) -> None:
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.name, self.finished = name, False

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                events.put((self.name, text))

    class Rows(BaseStreamer):
        def __init__(self) -> None:
            self.rows = [Row(name) for name in rows]

        def put(self, value) -> None:
            prompt = value.dim() > 1  # the prompt comes first, (rows, length); then one token per row
            for i, row in enumerate(self.rows):
                if row.finished:
                    continue
                row.put(value[i:i + 1])
                if not prompt and int(value[i]) == tokenizer.eos_token_id:
                    row.finished = True
                    row.end()

        def end(self) -> None:
            for row in self.rows:
                if not row.finished:
                    row.end()
            events.put(None)

    return Rows()


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

    def prompt_text(self, instruction: str, input: str = "") -> str:
        """The templated text the model continues (after the BOS token)."""
        return build_prompt(instruction.strip(), input.strip())

    def prompt_ids(self, instruction: str, input: str = "") -> list[int]:
        return encode_prompt(self.tokenizer, self.prompt_text(instruction, input))

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

    def stream_both(self, instruction: str, input: str = "", settings: Settings = Settings()) -> PairStream:
        """Start answering with the base and the tuned model at once; iterate for (side, piece).

        Greedy answers are the ones `stream` gives each side alone. Sampled ones
        differ from a one-side draw with the same seed (the two rows share the
        generator), and are the same for the same seed.
        """
        import torch

        check_instruction(instruction)
        ids = self.prompt_ids(instruction, input)
        pair = PairStream()
        streamer = _row_streamer(self.tokenizer, SIDES, pair._events)
        result: dict = {}
        adapter = self.model.active_adapter
        names = ["__base__" if side == "base" else adapter for side in SIDES]

        def work() -> None:
            try:
                with self._lock, torch.inference_mode():
                    if settings.sampling:
                        torch.manual_seed(settings.seed)
                    input_ids = torch.tensor([ids] * len(SIDES), device=self.device)
                    result["ids"] = self.model.generate(
                        input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                        generation_config=settings.generation_config(self.tokenizer), streamer=streamer,
                        stopping_criteria=_stop_when(pair.stop_flag), adapter_names=names,
                    )[:, len(ids):].tolist()
            except BaseException as exc:  # noqa: BLE001 - handed to the reading side
                result["error"] = exc
                pair._events.put(None)

        start = time.perf_counter()
        thread = threading.Thread(target=work, daemon=True)

        def finish() -> None:
            thread.join()
            if "error" in result:
                raise result["error"]
            seconds = time.perf_counter() - start
            pair.answers = {side: self._answer(row, pair.stop_flag.is_set(), seconds)
                            for side, row in zip(SIDES, result["ids"])}

        pair._finish = finish
        thread.start()
        return pair

    def _answer(self, new: list[int], flagged: bool, seconds: float) -> Answer:
        eos = self.tokenizer.eos_token_id
        stopped = eos in new
        if stopped:
            new = new[: new.index(eos)]
        reason: StopReason = "eos" if stopped else "stopped" if flagged else "length"
        return Answer(
            text=self.tokenizer.decode(new, skip_special_tokens=True).strip(),
            new_tokens=len(new) + int(stopped), stop_reason=reason, seconds=seconds,
        )

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
                        stopping_criteria=_stop_when(stream.stop_flag),
                    )[0, len(ids):].tolist()
            except BaseException as exc:  # noqa: BLE001 - handed to the reading side
                result["error"] = exc
                streamer.end()

        start = time.perf_counter()
        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            yield from streamer
        except KeyboardInterrupt:
            # Ctrl-C at a terminal stops this answer, not the program: what is left comes at once and is kept.
            stream.stop()
            yield from streamer
        except GeneratorExit:
            # A reader that leaves early stops the generation rather than waiting for it.
            stream.stop()
            thread.join()
            raise
        thread.join()
        if "error" in result:
            raise result["error"]
        stream.answer = self._answer(result["ids"], stream.stop_flag.is_set(), time.perf_counter() - start)


@dataclass(frozen=True)
class ModelInfo:
    """What the chat says about its models: names and the run's facts, never a machine's paths."""

    base: str
    adapter: str
    details: list[str]


def _json(path: Path) -> dict | None:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


def _base_name(base_dir: Path, meta: TrainMeta) -> str:
    try:
        info = BaseInfo.read(base_dir)
    except SabiaError:
        info = None
    if info is not None and info.source == "tiny":
        return "tiny test model (built by the base stage)"
    name = str(meta.base.get("name_or_path") or base_dir)
    revision = meta.base.get("revision")
    # A local folder is named by its last part: the rest is where this machine keeps it.
    shown = name if revision else Path(name).name
    return f"{shown} @ {str(revision)[:7]}" if revision else shown


def describe_models(base_dir: str | Path, adapter_dir: str | Path, metrics_dir: str | Path | None) -> ModelInfo:
    """Names and headline facts for the page: the adapter's LoRA settings and how the base was loaded
    (its own files), the training run and the evaluation (`metrics_dir`, the project's metrics, which
    describe the project's adapter). What is missing is left out."""
    adapter_dir = Path(adapter_dir)
    meta = TrainMeta.read(adapter_dir)
    details = []
    lora = _json(adapter_dir / "adapter_config.json") or {}
    if lora:
        details.append(f"LoRA r={lora.get('r')}, alpha={lora.get('lora_alpha')} on "
                       f"{', '.join(sorted(lora.get('target_modules') or []))}")
    details.append(f"base loaded as {meta.quantization}" + (" (double quant)" if meta.double_quant else "")
                   + f", {meta.precision}")
    metrics = Path(metrics_dir) if metrics_dir is not None else None
    train = _json(metrics / "train.json") if metrics else None
    if train:
        details.append(f"trained {train.get('steps')} steps, {train.get('epochs')} epochs on "
                       f"{train.get('train_rows')} rows; validation loss {train.get('eval_loss')}")
    evaluation = _json(metrics / "eval.json") if metrics else None
    if evaluation and isinstance(evaluation.get("base"), dict) and isinstance(evaluation.get("tuned"), dict):
        shown = [key for key in ("rougeL", "chrf", "eos_stop_rate") if key in evaluation["tuned"]]
        details.append(f"evaluation on {evaluation.get('samples')} test prompts (base → tuned): " + "; ".join(
            f"{key} {evaluation['base'].get(key)} → {evaluation['tuned'][key]}" for key in shown))
    return ModelInfo(base=_base_name(Path(base_dir), meta), adapter=adapter_dir.name, details=details)
