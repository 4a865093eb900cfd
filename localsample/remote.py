"""A model run by an OpenAI-compatible engine elsewhere (llama-server, vLLM, Ollama, another
localsample daemon): a catalog entry with ``endpoint`` or ``endpoints`` (replicas).

:class:`RemoteGenerator` is a ``Generator`` like the in-process engine, with the same
semantics: text streams to ``on_text`` as it arrives; stop sequences are matched here on
the stream (engines strip the stop string and report only ``finish_reason: "stop"``, so
they are not sent: the stream is closed as soon as one matches, which stops the engine);
``max_tokens`` is the request's, and ``finish_reason: "length"`` is ``maxTokens``;
cancelling closes the stream at once. Tools and ``response_format`` are passed through;
every call that comes back is checked against its tool's schema, and a malformed one gets
one retry before the request fails naming the engine. Usage comes from the engine
(``stream_options.include_usage``), or is counted from the chunks.

Replicas are balanced by requests in flight. A replica that fails before the first token
(no connection, a timeout, a 5xx) is skipped for ``BACKOFF_S`` and the request goes to
the next one (each replica once); after the first token a failure ends the request with an
error naming the endpoint (and a lost connection backs that replica off too). A request
that finds every replica at ``max_concurrency`` waits for one to free, up to the queue
timeout, as a local model's queue does. Health is cached: ``available`` probes
``GET /models`` (bounded by ``PROBE_TIMEOUT_S``) at most every ``HEALTH_TTL_S`` seconds.
With the ``offline`` setting only loopback endpoints are used. Nothing here runs unless a
catalog entry names an endpoint.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import logging
import os
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx2
import jsonschema
import openai
from openai.types.chat import ChatCompletionChunk

from localsample.catalog import ModelEntry
from localsample.errors import BusyError, EngineError, RequestError, ToolCallError
from localsample.generation import Completion, GenerationRequest, OnText, StopMatcher, ToolCall
from localsample.openai_request import chat_body
from localsample.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["RemoteGenerator", "is_loopback"]

BACKOFF_S = 30.0
"""How long a replica that failed is skipped before it is tried (probed) again."""
HEALTH_TTL_S = 30.0
PROBE_TIMEOUT_S = 2.0
CONNECT_TIMEOUT_S = 10.0
FINISH = {"length": "maxTokens", "tool_calls": "toolUse"}


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The system's trust store, loaded once for every https endpoint."""
    return ssl.create_default_context()


class BeforeFirstToken(Exception):
    """A replica failed before it sent anything: the request may go to another one.
    ``back_off``: the replica itself is failing (not only this answer), so skip it a while."""

    def __init__(self, why: str, back_off: bool = True) -> None:
        super().__init__(why)
        self.back_off = back_off


@dataclass
class Replica:
    url: str
    in_flight: int = 0
    sent: int = 0
    """Requests sent over its life: among equally busy replicas the least used goes next."""
    failed_until: float = 0.0
    error: str | None = None
    checked: float = -1.0
    """When ``GET /models`` was last sent (monotonic; negative: never)."""

    def state(self) -> str:
        if self.error == "not used offline":
            return "offline: not used"
        if self.failed_until > time.monotonic():
            return f"failing ({self.error})"
        return "ok" if self.error is None else f"ok again (last: {self.error})"


@dataclass
class Stream:
    """What one streamed answer has come to."""

    text: list[str] = field(default_factory=list)
    calls: dict[int, dict[str, str]] = field(default_factory=dict)
    chunks: int = 0
    finish: str | None = None
    stop: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int | None = None
    first: float | None = None

    @property
    def begun(self) -> bool:
        """Whether any of the answer (text or a call) came: before that, another replica
        may take the request over without the caller seeing a difference."""
        return self.chunks > 0 or bool(self.calls)

    def take(self, chunk: ChatCompletionChunk, matcher: StopMatcher, started: float) -> str:
        """Add one chunk; the text that may be shown now (a possible stop is held back)."""
        if chunk.usage is not None:
            self.prompt_tokens, self.completion_tokens = chunk.usage.prompt_tokens, chunk.usage.completion_tokens
        if not chunk.choices:
            return ""
        choice = chunk.choices[0]
        self.first = self.first or time.perf_counter() - started
        self.finish = choice.finish_reason or self.finish
        for call in choice.delta.tool_calls or ():
            part = self.calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
            part["id"] = call.id or part["id"]
            if call.function is not None:
                part["name"] += call.function.name or ""
                part["arguments"] += call.function.arguments or ""
        if not choice.delta.content:
            return ""
        self.chunks += 1
        safe, self.stop = matcher.feed(choice.delta.content)
        self.text.append(safe)
        return safe


class RemoteGenerator:
    """The ``Generator`` of a remote catalog entry (see the module's docstring)."""

    def __init__(self, model: ModelEntry, settings: Settings) -> None:
        self.model = model
        self.model_id = model.id
        self.settings = settings
        self.replicas = [Replica(url) for url in model.urls]
        self.limit = model.max_concurrency or settings.parallel
        self.clients: dict[str, openai.AsyncOpenAI] = {}
        """By replica URL, for ``clients_loop`` (see ``client``)."""
        self.clients_loop: asyncio.AbstractEventLoop | None = None
        self.waiting: list[anyio.Event] = []
        """Requests waiting for a replica below ``limit`` (set when a request ends)."""

    # -- the seam's bookkeeping (nothing to load) ----------------------------------------

    @property
    def loaded(self) -> bool:
        return True

    @property
    def size(self) -> int:
        return 0

    @property
    def running(self) -> int:
        return sum(r.in_flight for r in self.replicas)

    async def ensure_loaded(self) -> None:
        return None

    async def reset_cache(self) -> None:
        return None

    def close(self) -> None:
        """Forget the clients (their idle connections close when collected; ``aclose``
        closes them at once, from their event loop)."""
        self.clients = {}

    def status(self) -> list[dict[str, Any]]:
        return [{"url": r.url, "in_flight": r.in_flight, "state": r.state()} for r in self.replicas]

    # -- health ---------------------------------------------------------------------------

    def allowed(self, replica: Replica) -> bool:
        return not self.settings.offline or is_loopback(replica.url)

    def headers(self) -> dict[str, str]:
        headers = dict(self.model.headers)
        key = os.environ.get(self.model.api_key_env or "")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def available(self) -> bool:
        """Whether a replica is usable: allowed (``offline``), not backing off, and answering
        ``GET /models`` when last probed. Selection calls this on the event loop, so only a
        replica's first probe is waited for (bounded by ``PROBE_TIMEOUT_S``); a check older
        than ``HEALTH_TTL_S`` is refreshed on a thread while the cached state answers."""
        now = time.monotonic()
        for replica in self.replicas:
            if not self.allowed(replica) or replica.failed_until > now:
                continue
            if replica.checked < 0:
                self.probe(replica)
            elif now - replica.checked >= HEALTH_TTL_S:
                replica.checked = now  # one refresh at a time
                threading.Thread(target=self.probe, args=(replica,), name="localsample-probe", daemon=True).start()
            if replica.failed_until <= now:
                return True
        return False

    def why_unavailable(self) -> str:
        """Why ``available`` said no, for selection's reason (offline named as such)."""
        if not any(self.allowed(r) for r in self.replicas):
            return (
                f"offline: its endpoints ({', '.join(self.model.urls)}) are not loopback "
                "(drop --offline, or set offline = false)"
            )
        errors = "; ".join(f"{r.url}: {r.error or 'backing off'}" for r in self.replicas if self.allowed(r))
        return f"no endpoint answers ({errors}; `localsample doctor` checks them)"

    def probe_all(self) -> None:
        """Probe every replica offline mode allows (`models list` shows each one's state)."""
        for replica in self.replicas:
            if self.allowed(replica):
                self.probe(replica)
            else:
                replica.error = "not used offline"

    def probe(self, replica: Replica) -> None:
        replica.checked = time.monotonic()
        try:
            response = httpx2.get(replica.url + "/models", headers=self.headers(), timeout=PROBE_TIMEOUT_S)
            if response.status_code >= 500:
                raise httpx2.HTTPError(f"HTTP {response.status_code}")
        except httpx2.HTTPError as exc:
            self.failed(replica, f"no answer to GET /models: {exc}")
            return
        replica.error = None

    def failed(self, replica: Replica, why: str) -> None:
        replica.failed_until, replica.error = time.monotonic() + BACKOFF_S, why
        log.warning("%s: endpoint %s failed (%s); skipped for %g s", self.model_id, replica.url, why, BACKOFF_S)

    # -- generating ----------------------------------------------------------------------

    async def generate(
        self, request: GenerationRequest, on_text: OnText | None = None, *, queue_timeout: float | None = None
    ) -> Completion:
        usable = [r for r in self.replicas if self.allowed(r)]
        if not usable:
            raise EngineError(
                f"model '{self.model_id}' runs at {', '.join(self.model.urls)}, which offline mode refuses "
                "(only loopback endpoints are used offline)",
                "drop --offline (or offline = true in the settings), or use a local model",
            )
        waited = self.model.timeout if queue_timeout is None else queue_timeout
        deadline = time.monotonic() + waited
        problems: list[str] = []
        left = list(usable)
        while left:  # each replica once, chosen when it is its turn (not at the start)
            replica = await self.choose(left, deadline, waited)
            left.remove(replica)
            for attempt in (1, 2):
                try:
                    return await self.generate_on(replica, request, on_text)
                except BeforeFirstToken as exc:
                    if exc.back_off:
                        self.failed(replica, str(exc))
                    problems.append(f"{replica.url}: {exc}")
                    break
                except ToolCallError as exc:
                    if attempt == 2:
                        raise EngineError(f"{exc.problem} (twice, from {replica.url})", exc.fix) from exc
                    log.warning("%s: %s; retrying once", self.model_id, exc.problem)
        raise EngineError(
            f"no endpoint of model '{self.model_id}' answered: " + "; ".join(problems),
            "start the engine(s), or check the URL in the catalog (`localsample doctor` checks each endpoint)",
        )

    async def choose(self, left: list[Replica], deadline: float, waited: float) -> Replica:
        """The replica to try next: the one with the fewest requests in flight (of equally busy
        ones, the least used) among those not backing off; replicas backing off only when no
        other is left. When every candidate has ``max_concurrency`` requests, wait for one to
        end, as a local model's queue does, until ``deadline`` (then BusyError)."""
        while True:
            now = time.monotonic()
            candidates = [r for r in left if r.failed_until <= now] or left
            free = [r for r in candidates if r.in_flight < self.limit]
            if free:
                return min(free, key=lambda r: (r.in_flight, r.sent))
            if now >= deadline:
                raise BusyError(
                    f"busy: waited {waited:g} s for a free slot on the endpoints of model '{self.model_id}' "
                    f"(each has {self.limit} requests: max_concurrency)",
                    "retry later, or raise max_concurrency in the catalog entry or the queue_timeout setting",
                )
            freed = anyio.Event()
            self.waiting.append(freed)
            try:
                with anyio.move_on_after(deadline - now):
                    await freed.wait()
            finally:
                self.waiting.remove(freed)

    async def generate_on(self, replica: Replica, request: GenerationRequest, on_text: OnText | None) -> Completion:
        """One request on one replica (``choose`` saw it below its ``max_concurrency``: the
        engine queues what it accepts; this bounds how much we hand it)."""
        replica.in_flight += 1
        replica.sent += 1
        started = time.perf_counter()
        stream = Stream()
        try:
            await self.read(replica, request, on_text, stream, started)
        finally:
            replica.in_flight -= 1
            for waiter in self.waiting:
                waiter.set()
        return self.completion(replica, request, stream, started)

    def client(self, replica: Replica) -> openai.AsyncOpenAI:
        """The client for a replica: one per replica and event loop, so that requests reuse
        their connections (a new client and connection per request cost ~3 ms). A new loop
        (or a new key in ``api_key_env``) gets new clients. Their HTTP clients share one TLS
        context: building a default one per client costs ~40 ms."""
        loop = asyncio.get_running_loop()
        if self.clients_loop is not loop:
            self.clients, self.clients_loop = {}, loop  # the old loop's connections went with it
        key = os.environ.get(self.model.api_key_env or "") or "none"
        found = self.clients.get(replica.url)
        if found is None or found.api_key != key:
            timeout = httpx2.Timeout(self.model.timeout, connect=min(CONNECT_TIMEOUT_S, self.model.timeout))
            found = openai.AsyncOpenAI(
                base_url=replica.url,
                api_key=key,
                timeout=timeout,
                max_retries=0,
                default_headers=self.model.headers,
                http_client=httpx2.AsyncClient(verify=tls_context(), timeout=timeout),
            )
            self.clients[replica.url] = found
        return found

    async def aclose(self) -> None:
        """Close the connections this event loop's clients hold."""
        clients, self.clients = self.clients, {}
        if self.clients_loop is asyncio.get_running_loop():
            for client in clients.values():
                await client.close()

    def body(self, request: GenerationRequest) -> dict[str, Any]:
        """The request for this engine: stop strings are matched here (not sent: engines
        report only ``stop``, and the stream is closed at the match anyway); ``max_tokens``
        is what every engine reads; a repeat penalty goes under both names in use
        (llama.cpp's ``repeat_penalty``, vLLM's ``repetition_penalty``: engines ignore the
        other one)."""
        body = chat_body(request, self.model.remote_model or self.model_id)
        body.pop("stop", None)
        body["max_tokens"] = body.pop("max_completion_tokens")
        if "repeat_penalty" in body:
            body["repetition_penalty"] = body["repeat_penalty"]
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        return body

    async def read(
        self, replica: Replica, request: GenerationRequest, on_text: OnText | None, stream: Stream, started: float
    ) -> None:
        matcher = StopMatcher(request.stop)
        try:
            response = await self.client(replica).chat.completions.create(**self.body(request))
            async with response as chunks:  # leaving it early closes the connection: the engine stops
                async for chunk in chunks:
                    safe = stream.take(chunk, matcher, started)
                    if safe and on_text is not None:
                        await on_text(safe, stream.chunks)
                    if stream.stop is not None:
                        return
            stream.text.append(matcher.flush())
        except openai.APIError as exc:
            raise self.engine_error(exc, replica, stream) from exc
        if stream.finish is None:
            raise self.cut_short(replica, stream)

    def cut_short(self, replica: Replica, stream: Stream) -> Exception:
        """A stream that ended without a finish reason was cut by the engine, not finished:
        never an ``endTurn``. (llama-cpp-python's server ends a stream that way when another
        request arrives, unless started with ``--interrupt_requests False``.)"""
        if not stream.begun:
            return BeforeFirstToken("the stream ended before any answer", back_off=False)  # it answers
        return EngineError(
            f"the engine at {replica.url} ended the answer without a finish reason after {stream.chunks} "
            "pieces (it cut the stream)",
            "retry; for llama-cpp-python's server, start it with --interrupt_requests False so that "
            "concurrent requests queue instead of cutting each other",
        )

    def engine_error(self, exc: openai.APIError, replica: Replica, stream: Stream) -> Exception:
        """What a failure of the engine is: the key, the model name, the request, or the
        engine itself (before the first token: another replica may answer)."""
        status = exc.status_code if isinstance(exc, openai.APIStatusError) else None
        name = self.model.remote_model or self.model_id
        if status in (401, 403):
            fix = (
                f"set {self.model.api_key_env} to a key it accepts"
                if self.model.api_key_env
                else ('add api_key_env = "VARIABLE" to the catalog entry and set that variable to the key')
            )
            return EngineError(f"the engine at {replica.url} refused the key (HTTP {status}) for '{name}'", fix)
        if status == 404:
            return EngineError(
                f"the engine at {replica.url} does not serve '{name}' ({exc.message})",
                "set remote_model in the catalog entry to a name its GET /models lists",
            )
        if status is not None and status < 500:
            return RequestError(f"the engine at {replica.url} refused the request (HTTP {status}): {exc.message}")
        if not stream.begun:
            return BeforeFirstToken(f"{type(exc).__name__}: {exc.message}")
        if isinstance(exc, openai.APIConnectionError):  # it went away mid-answer: spare the next request
            self.failed(replica, f"lost mid-answer: {type(exc).__name__}")
        return EngineError(
            f"the engine at {replica.url} failed while answering ({type(exc).__name__}: {exc.message})",
            "retry; if it keeps failing, see the engine's log",
        )

    def completion(self, replica: Replica, request: GenerationRequest, stream: Stream, started: float) -> Completion:
        calls = tuple(self.tool_call(request, part, replica) for _, part in sorted(stream.calls.items()))
        if stream.stop is not None:
            reason = "stopSequence"
        elif calls:
            reason = "toolUse"
        else:
            reason = FINISH.get(stream.finish or "", "endTurn")
        tokens = stream.completion_tokens if stream.completion_tokens is not None else stream.chunks
        if stream.stop is not None:
            tokens = stream.chunks  # the stream was closed before the engine's count came
        return Completion(
            text="".join(stream.text),
            model=self.model_id,
            stop_reason=reason,  # type: ignore[arg-type]
            stop_sequence=stream.stop,
            prompt_tokens=stream.prompt_tokens,
            completion_tokens=tokens,
            time_to_first_token=stream.first or 0.0,
            duration=time.perf_counter() - started,
            tool_calls=calls,
            engine=replica.url,
        )

    def tool_call(self, request: GenerationRequest, part: dict[str, str], replica: Replica) -> ToolCall:
        """A call the engine returned, checked against its tool's schema (ToolCallError if not)."""
        tool = next((t for t in request.tools if t.name == part["name"]), None)
        try:
            arguments = json.loads(part["arguments"] or "{}")
            if tool is None:
                raise ValueError(f"it calls '{part['name']}', which was not offered")
            if not isinstance(arguments, dict):
                raise ValueError("its arguments are not a JSON object")
            jsonschema.validate(arguments, dict(tool.input_schema))
        except (ValueError, jsonschema.ValidationError) as exc:
            why = exc.message if isinstance(exc, jsonschema.ValidationError) else str(exc)
            raise ToolCallError(
                f"the engine at {replica.url} returned a malformed tool call: {why}",
                "use a model that calls tools reliably, or retry",
            ) from exc
        return ToolCall(part["id"] or f"call_{os.urandom(8).hex()}", part["name"], arguments)
