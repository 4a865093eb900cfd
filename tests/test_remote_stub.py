"""Remote entries against a small stub engine (threads in this process, loopback), only for
what a real engine cannot be made to do on demand: a tool call that breaks its schema, an
engine that does not answer within the entry's ``timeout``. Also: a request that finds every
replica at ``max_concurrency`` waits for one, up to the queue timeout."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp.types import INTERNAL_ERROR

from localsample import remote
from localsample.catalog import load_catalog
from localsample.errors import BusyError, EngineError
from localsample.generation import ChatMessage, Completion, GenerationRequest, ToolSpec
from localsample.remote import HEALTH_TTL_S, RemoteGenerator
from localsample.runtime import Runtime
from localsample.settings import load_settings

from .conftest import fake_factory

WEATHER = ToolSpec("weather", "", {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
ASK = GenerationRequest(messages=[ChatMessage("user", "Paris?")], max_tokens=40, tools=(WEATHER,))
HI = GenerationRequest(messages=[ChatMessage("user", "Hi")], max_tokens=5)


def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    body = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "stub",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def call_chunk(arguments: str) -> bytes:
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "weather", "arguments": arguments}}
    return chunk({"role": "assistant", "tool_calls": [call]})


ANSWERS = {
    "bad call": [call_chunk('{"town": "Paris"}'), chunk({}, "tool_calls")],
    "good call": [call_chunk('{"city": "Paris"}'), chunk({}, "tool_calls")],
    "text": [chunk({"role": "assistant", "content": "Hello"}), chunk({"content": " there"}, "stop")],
    "cut": [chunk({"role": "assistant", "content": "Hel"})],
    "cut at once": [chunk({"role": "assistant"})],
}
"""What the stub streams (then ``[DONE]``). The cut ones end without a finish reason, as
llama-cpp-python's server does to a stream when another request arrives."""


class Stub(http.server.ThreadingHTTPServer):
    """Answers each POST with the next of ``plan`` (a key of ANSWERS, or "slow": text after
    ``delay`` seconds); ``seen`` counts the requests."""

    def __init__(self, plan: list[str], delay: float = 0.0) -> None:
        super().__init__(("127.0.0.1", 0), StubHandler)
        self.plan, self.delay, self.seen = plan, delay, 0
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1"


class StubHandler(http.server.BaseHTTPRequestHandler):
    server: Stub

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        stub = self.server
        stub.seen += 1
        kind = stub.plan[min(stub.seen, len(stub.plan)) - 1]
        if kind == "slow":
            time.sleep(stub.delay)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for part in ANSWERS["text" if kind == "slow" else kind]:
                self.wfile.write(part)
            self.wfile.write(b"data: [DONE]\n\n")
        except OSError:  # the client gave up (a timeout): nothing to answer
            pass

    def do_GET(self) -> None:  # GET /models, after ``delay``
        time.sleep(self.server.delay)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"object": "list", "data": [{"id": "stub", "object": "model"}]}')
        except OSError:
            pass

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture
def stubs() -> Iterator[list[Stub]]:
    started: list[Stub] = []
    yield started
    for stub in started:
        stub.shutdown()
        stub.server_close()


def serve(stubs: list[Stub], plan: list[str], delay: float = 0.0) -> Stub:
    stub = Stub(plan, delay)
    threading.Thread(target=stub.serve_forever, args=(0.02,), daemon=True).start()  # quick shutdown
    stubs.append(stub)
    return stub


def generator(isolated: Path, *urls: str, extra: str = "") -> RemoteGenerator:
    listed = ", ".join(f'"{url}"' for url in urls)
    (isolated / "models.toml").write_text(f'[[models]]\nid = "box"\nendpoints = [{listed}]\n{extra}')
    settings = load_settings()
    return RemoteGenerator(load_catalog(settings.catalog_path).get("box"), settings)


def test_a_malformed_tool_call_is_retried_once_then_fails_naming_the_engine(isolated: Path, stubs: list[Stub]) -> None:
    stub = serve(stubs, ["bad call"])
    with pytest.raises(EngineError, match="malformed tool call") as failed:
        anyio.run(generator(isolated, stub.url).generate, ASK)
    assert stub.seen == 2 and f"(twice, from {stub.url})" in str(failed.value)
    assert failed.value.mcp_code == INTERNAL_ERROR  # -32603


def test_a_malformed_tool_call_then_a_valid_one_is_answered(isolated: Path, stubs: list[Stub]) -> None:
    stub = serve(stubs, ["bad call", "good call"])
    answer = anyio.run(generator(isolated, stub.url).generate, ASK)
    assert stub.seen == 2 and answer.stop_reason == "toolUse"
    assert answer.tool_calls[0].name == "weather" and answer.tool_calls[0].arguments == {"city": "Paris"}


def test_an_engine_past_its_timeout_before_the_first_token_fails_over(isolated: Path, stubs: list[Stub]) -> None:
    slow, fine = serve(stubs, ["slow"], delay=3.0), serve(stubs, ["text"])
    remote = generator(isolated, slow.url, fine.url, extra="timeout = 0.5\n")
    answer = anyio.run(remote.generate, HI)
    assert answer.engine == fine.url and answer.text == "Hello there" and answer.stop_reason == "endTurn"
    assert remote.status()[0]["state"].startswith("failing (APITimeoutError")


def test_a_request_waits_for_a_replica_below_max_concurrency(isolated: Path, stubs: list[Stub]) -> None:
    stub = serve(stubs, ["slow"], delay=0.3)
    remote = generator(isolated, stub.url, extra="max_concurrency = 1\n")
    answers: list[Completion] = []

    async def one() -> None:
        answers.append(await remote.generate(HI, queue_timeout=10))

    async def both() -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(one)
            group.start_soon(one)

    anyio.run(both)
    assert [a.text for a in answers] == ["Hello there"] * 2 and stub.seen == 2


def test_a_request_that_waits_past_the_queue_timeout_is_busy(isolated: Path, stubs: list[Stub]) -> None:
    stub = serve(stubs, ["slow"], delay=0.5)
    remote = generator(isolated, stub.url, extra="max_concurrency = 1\n")
    failures: list[BusyError] = []

    async def second() -> None:
        await anyio.sleep(0.1)  # the first is in flight by now
        try:
            await remote.generate(HI, queue_timeout=0.1)
        except BusyError as exc:
            failures.append(exc)

    async def both() -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(remote.generate, HI)
            group.start_soon(second)

    anyio.run(both)
    assert stub.seen == 1 and len(failures) == 1 and "max_concurrency" in str(failures[0])


def test_a_stream_cut_after_text_is_an_error_not_an_end_of_turn(isolated: Path, stubs: list[Stub]) -> None:
    stub = serve(stubs, ["cut"])
    with pytest.raises(EngineError, match="without a finish reason") as failed:
        anyio.run(generator(isolated, stub.url).generate, HI)
    assert "--interrupt_requests False" in str(failed.value)


def test_a_stream_cut_before_any_text_goes_to_the_next_replica(isolated: Path, stubs: list[Stub]) -> None:
    cut, fine = serve(stubs, ["cut at once"]), serve(stubs, ["text"])
    remote = generator(isolated, cut.url, fine.url)
    answer = anyio.run(remote.generate, HI)
    assert answer.engine == fine.url and answer.text == "Hello there"
    assert remote.status()[0]["state"] == "ok"  # it answers: not backed off for cutting one stream


def test_a_stale_health_check_is_refreshed_without_holding_up_selection(
    isolated: Path, stubs: list[Stub], monkeypatch: pytest.MonkeyPatch
) -> None:
    stub = serve(stubs, ["text"], delay=1.0)  # GET /models takes a second
    monkeypatch.setattr(remote, "PROBE_TIMEOUT_S", 0.3)
    box = generator(isolated, stub.url)
    box.replicas[0].checked = time.monotonic() - HEALTH_TTL_S - 1  # it answered, long ago
    started = time.monotonic()
    assert box.available() and time.monotonic() - started < 0.2  # the cached state, at once
    deadline = time.monotonic() + 5
    while box.replicas[0].error is None:  # the refresh, on a thread, times out
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert not box.available() and "GET /models" in box.status()[0]["state"]


def test_one_client_per_replica_is_kept_and_the_pool_closes_it(isolated: Path, stubs: list[Stub]) -> None:
    stub = serve(stubs, ["text"])
    box = generator(isolated, stub.url)
    runtime = Runtime(load_settings(), factory=fake_factory())
    runtime.pool.resident(box.model).generator = box

    async def go() -> None:
        async with runtime.pool.use(box.model) as using:
            await using.generate(HI)
        first = box.clients[stub.url]
        async with runtime.pool.use(box.model) as using:
            await using.generate(HI)
        assert box.clients == {stub.url: first}  # the same client: its connections are reused
        await runtime.pool.aclose()
        assert box.clients == {} and first.is_closed()

    anyio.run(go)
    assert stub.seen == 2
