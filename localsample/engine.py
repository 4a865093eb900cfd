"""One loaded GGUF model: chat prompt, streaming generation, stop sequences, cancellation.

Every llama.cpp call of an engine (load and generation) runs on one dedicated thread of
its own. llama.cpp's CPU backend parallelises with OpenMP, and each thread that calls it
gets its own OpenMP team whose threads spin after each token: calls from several threads
leave teams competing for the cores (measured: -20% decode speed on 2 cores).

Requests are decoded by the engine's ``Batcher`` (batch.py): concurrent requests share
one context and advance together, one token per step. Text crosses into asyncio through
``_TextChannel``. The cancel flag is checked every step, so a cancelled request stops
within one token and its slot is free for the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import io
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anyio

from localsample.batch import Batcher
from localsample.catalog import ModelEntry
from localsample.errors import ModelFileError, RequestError

if TYPE_CHECKING:
    from llama_cpp import Llama

log = logging.getLogger(__name__)

Role = Literal["system", "user", "assistant"]
StopReason = Literal["endTurn", "stopSequence", "maxTokens"]
OnText = Callable[[str, int], Awaitable[None]]
"""Called on the event loop with each new piece of text and the completion tokens so far."""

STREAM_INTERVAL = 0.05
"""Seconds between deliveries of streamed text to the event loop (about 20 a second)."""

# llama-cpp-python's own defaults for create_completion, used when neither the request
# nor the catalog entry sets a value.
LLAMA_DEFAULTS: dict[str, float | int] = {
    "temperature": 0.8,
    "top_p": 0.95,
    "top_k": 40,
    "min_p": 0.05,
    "repeat_penalty": 1.0,
}


@dataclass(frozen=True)
class ChatMessage:
    role: Role
    content: str


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate. ``None`` sampling values fall back to the catalog's defaults."""

    messages: Sequence[ChatMessage]
    max_tokens: int
    system: str | None = None
    stop: Sequence[str] = ()
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens <= 0:
            raise RequestError(f"maxTokens must be positive (got {self.max_tokens})", "send maxTokens >= 1")
        if not self.messages:
            raise RequestError("the request has no messages", "send at least one user message")


@dataclass(frozen=True)
class Completion:
    """A finished generation with its counts and timings (seconds)."""

    text: str
    model: str
    stop_reason: StopReason
    stop_sequence: str | None
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token: float
    duration: float

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens after the first, over the time after the first (prompt eval excluded)."""
        decode_time = self.duration - self.time_to_first_token
        if self.completion_tokens < 2 or decode_time <= 0:
            return 0.0
        return (self.completion_tokens - 1) / decode_time


class StopMatcher:
    """Finds stop sequences in streamed text, holding back a possible partial match."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""

    def feed(self, piece: str) -> tuple[str, str | None]:
        """Text safe to emit now, and the stop sequence found (the text before it is returned)."""
        if not self.stops:
            return piece, None
        text = self._held + piece
        found: tuple[int, str] | None = None
        for stop in self.stops:
            index = text.find(stop)
            if index >= 0 and (found is None or index < found[0]):
                found = (index, stop)
        if found is not None:
            self._held = ""
            return text[: found[0]], found[1]
        hold = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), hold, -1):
                if text.endswith(stop[:size]):
                    hold = size
                    break
        self._held = text[len(text) - hold :]
        return text[: len(text) - hold], None

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


@dataclass
class _Run:
    """State shared between the event loop and one generation's worker thread."""

    request: GenerationRequest
    emit: Callable[[str, int], None]
    cancel: threading.Event = field(default_factory=threading.Event)


class _TextChannel:
    """Text from the worker thread to the event loop, with as few loop wake-ups as can be.

    Waking the loop costs more than it seems: on a small machine the loop thread takes a
    core from llama.cpp's compute threads, and one wake per token cost 15-20% of decode
    speed on 2 cores. The worker wakes the loop only when the loop is idle and waiting
    ("armed"); while the loop is busy or pausing between deliveries, text piles up here.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._parts: list[str] = []
        self._tokens = 0
        self._armed = True
        self.wake = asyncio.Event()

    def put(self, text: str, tokens: int) -> None:
        """Worker thread: add text; wake the loop if it is waiting for some."""
        with self._lock:
            self._parts.append(text)
            self._tokens = tokens
            signal, self._armed = self._armed, False
        if signal:
            self._loop.call_soon_threadsafe(self.wake.set)

    def take(self) -> tuple[str, int] | None:
        """Event loop: all text so far and the token count, or None (and arm the wake)."""
        with self._lock:
            if not self._parts:
                self._armed = True
                return None
            text = "".join(self._parts)
            self._parts.clear()
            return text, self._tokens


class Engine:
    """A catalog entry's GGUF, loaded lazily on first use."""

    def __init__(self, model: ModelEntry, path: Path, slots: int = 8) -> None:
        self.model = model
        self.path = path
        self.slots = slots
        self._llama: Llama | None = None
        self._batcher: Batcher | None = None
        self._template: Any = None
        self._pieces: dict[int, bytes] = {}
        self._load_lock = threading.Lock()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama-{model.id}")
        self.tokens_generated = 0
        """Completion tokens produced over this engine's life (read by stats and tests)."""
        self.in_flight = 0
        """Requests queued or running on this engine (kept by the pool, on the event loop)."""
        self.last_used = time.monotonic()

    @property
    def size(self) -> int:
        """Bytes of the model's file(s): what loading it maps into memory."""
        from localsample.pool import files_size

        return files_size(self.path)

    # -- loading ---------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self._llama is not None

    async def ensure_loaded(self) -> None:
        """Load the model on the engine's thread without blocking the event loop. Returns at
        once when it is loaded (the thread may be busy running the batch loop)."""
        if self._llama is None:
            await asyncio.get_running_loop().run_in_executor(self._thread, self.load)

    def load(self) -> Llama:
        """Load the model (blocking). Idempotent. Prefer the engine's thread: see above."""
        with self._load_lock:
            if self._llama is None:
                self._llama = self._open()
            return self._llama

    def _open(self) -> Llama:
        check_gguf_file(self.path, self.model.id)
        from llama_cpp import Llama, llama_chat_format

        started = time.perf_counter()
        kwargs = self.model.load.llama_kwargs() | {"n_ctx": 64}  # generation runs in the batcher's context
        quiet_llama_logs()
        try:
            # verbose=False would make llama-cpp-python point the process's stdout and stderr
            # (fds 1 and 2) at /dev/null while the model loads: in `serve`, fd 1 is the MCP
            # channel, and whatever another thread wrote meanwhile was lost (a host's reply,
            # seen as a hang). Its chatter goes to the Python-level stderr, silenced here.
            with contextlib.redirect_stderr(io.StringIO()):
                llama = Llama(model_path=str(self.path), verbose=True, **kwargs)
        except (ValueError, RuntimeError) as exc:
            raise ModelFileError(
                f"llama.cpp could not load {self.path} for model '{self.model.id}': {exc}",
                "the file may be corrupt or of an architecture this llama-cpp-python does not "
                "know: download it again or upgrade llama-cpp-python",
            ) from exc
        template = self.model.chat_template or llama.metadata.get("tokenizer.chat_template")
        if not template:
            llama.close()
            raise ModelFileError(
                f"model '{self.model.id}' ({self.path}) has no chat template",
                "set chat_template in its catalog entry (a Jinja template, as in the model card)",
            )
        vocab = llama._model
        eos, bos = llama.token_eos(), llama.token_bos()
        self._template = llama_chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=vocab.token_get_text(eos) if eos != -1 else "",
            bos_token=vocab.token_get_text(bos) if bos != -1 else "",
        )
        self._batcher = Batcher(self, llama, self.slots)
        log.info("loaded %s from %s in %.2fs", self.model.id, self.path, time.perf_counter() - started)
        return llama

    def close(self) -> None:
        self._thread.shutdown(wait=True, cancel_futures=True)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama-{self.model.id}")
        with self._load_lock:
            if self._batcher is not None:
                self._batcher.close()
                self._batcher = None
            if self._llama is not None:
                self._llama.close()
                self._llama = None
                self._pieces.clear()

    async def reset_cache(self) -> None:
        """Forget every cached prompt (the next request evaluates its whole prompt)."""

        def reset() -> None:
            if self._batcher is not None:
                for slot in self._batcher.slots:
                    self._batcher.L.llama_memory_seq_rm(self._batcher.memory, slot.seq, -1, -1)
                    slot.tokens = []

        await asyncio.get_running_loop().run_in_executor(self._thread, reset)

    # -- generation ------------------------------------------------------------------

    async def generate(self, request: GenerationRequest, on_text: OnText | None = None) -> Completion:
        """Generate a completion, calling ``on_text`` with new text as it is produced.

        Text is delivered in pieces at most about every ``STREAM_INTERVAL`` seconds (the
        first piece at once). Cancelling the calling task stops the worker within one
        token; this coroutine returns only once the worker has let go of the model.
        """
        await self.ensure_loaded()
        assert self._batcher is not None
        loop = asyncio.get_running_loop()
        channel = _TextChannel(loop)
        run = _Run(request, channel.put)
        worker = asyncio.wrap_future(self._batcher.submit(run))
        worker.add_done_callback(lambda _: channel.wake.set())
        try:
            while True:
                finished = worker.done()  # read first: all text put before it is taken below
                item = channel.take()
                if item is not None and on_text is not None:
                    await on_text(*item)
                if finished:
                    return worker.result()
                if item is not None:
                    await asyncio.wait([worker], timeout=STREAM_INTERVAL)
                else:
                    await channel.wake.wait()
                    channel.wake.clear()
        finally:
            run.cancel.set()
            if not worker.done():
                with anyio.CancelScope(shield=True):
                    await asyncio.wait([worker])
            if not worker.cancelled():
                worker.exception()  # mark retrieved: a cancelled run's error is nobody's news

    def _prompt_tokens(self, llama: Llama, request: GenerationRequest) -> list[int]:
        messages: list[dict[str, str]] = []
        if request.system:
            messages.append({"role": "system", "content": request.system})
        messages.extend({"role": m.role, "content": m.content} for m in request.messages)
        try:
            prompt = self._template(messages=messages).prompt
        except Exception as exc:  # jinja2 raises many types, and templates call raise_exception
            raise RequestError(
                f"the chat template of '{self.model.id}' rejected the conversation: {exc}",
                "check the order of roles (most templates want user/assistant turns alternating, "
                "starting with user)",
            ) from exc
        return llama.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)

    def _sampling(self, request: GenerationRequest) -> dict[str, Any]:
        defaults = self.model.defaults
        chosen: dict[str, Any] = {}
        for name, fallback in LLAMA_DEFAULTS.items():
            value = getattr(request, name)
            if value is None:
                value = getattr(defaults, name)
            chosen[name] = fallback if value is None else value
        chosen["temp"] = chosen.pop("temperature")
        return chosen

    def _piece(self, llama: Llama, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            buffer = ctypes.create_string_buffer(64)
            from llama_cpp import llama_token_to_piece

            size = llama_token_to_piece(llama._model.vocab, token, buffer, len(buffer), 0, False)
            if size < 0:  # buffer too small: llama.cpp returns the size it needs, negated
                buffer = ctypes.create_string_buffer(-size)
                size = llama_token_to_piece(llama._model.vocab, token, buffer, len(buffer), 0, False)
            piece = buffer.raw[:size]
            self._pieces[token] = piece
        return piece


_LOG_CALLBACK: Any = None


def quiet_llama_logs() -> None:
    """Send llama.cpp's own log lines to our logger: errors as warnings, the rest at debug
    (its default callback prints them to stderr)."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is not None:
        return
    import llama_cpp

    @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
    def forward(level: int, text: bytes, _user_data: Any) -> None:
        message = text.decode("utf-8", errors="replace").rstrip()
        if message:
            log.log(logging.WARNING if level == 3 else logging.DEBUG, "llama.cpp: %s", message)

    _LOG_CALLBACK = forward  # keep a reference: llama.cpp holds only the C pointer
    llama_cpp.llama_log_set(forward, ctypes.c_void_p(0))


GGUF_MAGIC = b"GGUF"


def check_gguf_file(path: Path, model_id: str) -> None:
    """Raise ModelFileError unless ``path`` is a readable file that starts like a GGUF."""
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except FileNotFoundError as exc:
        raise ModelFileError(
            f"model '{model_id}': file {path} does not exist",
            "download it again (for the default model: `python scripts/fetch_model.py`) "
            "or correct `source` in the catalog",
        ) from exc
    except OSError as exc:
        raise ModelFileError(f"model '{model_id}': cannot read {path}: {exc}", "check the file's permissions") from exc
    if magic != GGUF_MAGIC:
        raise ModelFileError(
            f"model '{model_id}': {path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')",
            "download the model again; localsample loads only .gguf files",
        )
