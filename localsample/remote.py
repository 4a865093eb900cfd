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
error naming the endpoint. Health is cached: ``available`` probes ``GET /models`` (bounded
by ``PROBE_TIMEOUT_S``) at most every ``HEALTH_TTL_S`` seconds. With the ``offline``
setting only loopback endpoints are used. Nothing here runs unless a catalog entry names
an endpoint.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import os
import ssl
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

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
    """A replica failed before it sent anything: the request may go to another one."""


@dataclass
class Replica:
    url: str
    in_flight: int = 0
    sent: int = 0
    """Requests sent over its life: among equally busy replicas the least used goes next."""
    failed_until: float = 0.0
    error: str | None = None
    checked: float = -HEALTH_TTL_S

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
        return None

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
        ``GET /models`` when last probed (cached for ``HEALTH_TTL_S``)."""
        now = time.monotonic()
        for replica in self.replicas:
            if not self.allowed(replica) or replica.failed_until > now:
                continue
            if now - replica.checked >= HEALTH_TTL_S:
                self.probe(replica)
            if replica.failed_until <= now:
                return True
        return False

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
        problems: list[str] = []
        left = list(usable)
        while left:  # each replica once, the least busy healthy one first (chosen now, not at the start)
            now = time.monotonic()
            replica = min(left, key=lambda r: (r.failed_until > now, r.in_flight, r.sent))
            left.remove(replica)
            for attempt in (1, 2):
                try:
                    return await self.generate_on(replica, request, on_text)
                except BeforeFirstToken as exc:
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

    async def generate_on(self, replica: Replica, request: GenerationRequest, on_text: OnText | None) -> Completion:
        """One request on one replica; past its ``max_concurrency`` the answer is busy at once
        (the engine queues what it accepts; this bounds how much we hand it)."""
        if replica.in_flight >= self.limit:
            raise BusyError(
                f"busy: endpoint {replica.url} of model '{self.model_id}' has {replica.in_flight} requests "
                f"(max_concurrency = {self.limit})",
                "retry later, or raise max_concurrency in the catalog entry",
            )
        replica.in_flight += 1
        replica.sent += 1
        started = time.perf_counter()
        stream = Stream()
        try:
            await self.read(replica, request, on_text, stream, started)
        finally:
            replica.in_flight -= 1
        return self.completion(replica, request, stream, started)

    def client(self, replica: Replica) -> openai.AsyncOpenAI:
        """A client for one request (closed with it). Its HTTP client shares one TLS context:
        building a default one per client costs ~40 ms, more than the request's own overhead."""
        timeout = httpx2.Timeout(self.model.timeout, connect=min(CONNECT_TIMEOUT_S, self.model.timeout))
        key = os.environ.get(self.model.api_key_env or "") or "none"
        http = httpx2.AsyncClient(verify=tls_context(), timeout=timeout)
        return openai.AsyncOpenAI(
            base_url=replica.url,
            api_key=key,
            timeout=timeout,
            max_retries=0,
            default_headers=self.model.headers,
            http_client=http,
        )

    def body(self, request: GenerationRequest) -> dict[str, Any]:
        """The request for this engine: stop strings are matched here (not sent), and
        ``max_tokens`` is what every engine reads."""
        body = chat_body(request, self.model.remote_model or self.model_id)
        body.pop("stop", None)
        body["max_tokens"] = body.pop("max_completion_tokens")
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        return body

    async def read(
        self, replica: Replica, request: GenerationRequest, on_text: OnText | None, stream: Stream, started: float
    ) -> None:
        matcher = StopMatcher(request.stop)
        try:
            async with self.client(replica) as client:
                response = await client.chat.completions.create(**self.body(request))
                async with response as chunks:
                    async for chunk in chunks:
                        safe = stream.take(chunk, matcher, started)
                        if safe and on_text is not None:
                            await on_text(safe, stream.chunks)
                        if stream.stop is not None:
                            return  # closing the stream stops the engine
            stream.text.append(matcher.flush())
        except openai.APIError as exc:
            raise self.engine_error(exc, replica, stream) from exc

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
        if stream.first is None:
            return BeforeFirstToken(f"{type(exc).__name__}: {exc.message}")
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
