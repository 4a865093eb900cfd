"""`localsample daemon` as a process, on the real default model, driven by the official
``openai`` client over TCP (bearer token) and by httpx over its Unix socket: answers,
streaming, stop sequences, exact maxTokens, tool calls and structured output that validate
against their schemas, error statuses, the socket's permissions, one daemon at a time,
`localsample daemon stop`, and SIGTERM mid-generation. Slow: processes and a model.
Requests are greedy (temperature 0) and short."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import jsonschema
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from .daemon_process import TOKEN, Running, daemon_in, end, start_daemon

pytestmark = pytest.mark.slow
SMOL = "smollm2-135m-instruct"
STORY: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me a long story about a cat."}]


@pytest.fixture(scope="module")
def daemon(model_dir: Path) -> Iterator[Running]:
    with daemon_in(Path(tempfile.mkdtemp(prefix="lsd-"))) as running:
        yield running


# -- answers ----------------------------------------------------------------------------------


def test_an_answer_and_a_stream_of_it(daemon: Running) -> None:
    client = daemon.client()
    answer = client.chat.completions.create(model="gpt-4o-mini", messages=STORY, max_tokens=12, temperature=0)
    assert answer.model == SMOL and answer.choices[0].message.content
    assert answer.usage is not None and answer.usage.completion_tokens == 12
    stream = client.chat.completions.create(
        model=SMOL,
        messages=STORY,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) > 1 and "".join(texts) == answer.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    assert chunks[-2].choices[0].finish_reason == "length"


def test_a_stop_sequence_and_an_exact_max_tokens(daemon: Running) -> None:
    client = daemon.client()
    full = client.chat.completions.create(model=SMOL, messages=STORY, max_tokens=16, temperature=0)
    text = full.choices[0].message.content or ""
    words = text.split()
    assert len(words) > 3, text
    stop = words[2]
    stopped = client.chat.completions.create(model=SMOL, messages=STORY, max_tokens=16, temperature=0, stop=[stop])
    choice = stopped.choices[0]
    assert choice.finish_reason == "stop" and (choice.model_extra or {})["stop_reason"] == stop
    assert choice.message.content == text[: text.index(stop)]
    cut = client.chat.completions.create(model=SMOL, messages=STORY, max_tokens=5, temperature=0)
    assert cut.choices[0].finish_reason == "length" and cut.usage is not None and cut.usage.completion_tokens == 5


def test_a_required_tool_call_and_a_json_schema_answer_validate(daemon: Running) -> None:
    client = daemon.client()
    parameters: dict[str, Any] = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30}},
        "required": ["city"],
    }
    called = client.chat.completions.create(
        model=SMOL,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[{"type": "function", "function": {"name": "weather", "parameters": parameters}}],
        tool_choice="required",
        max_tokens=64,
        temperature=0,
    )
    choice = called.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert calls and len({call.id for call in calls}) == len(calls)  # the model may call more than once
    for call in calls:
        assert call.type == "function" and call.function.name == "weather"
        jsonschema.validate(json.loads(call.function.arguments), parameters)
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}, "sure": {"type": "boolean"}},
        "required": ["answer", "sure"],
        "additionalProperties": False,
    }
    shaped = client.chat.completions.create(
        model=SMOL,
        messages=[{"role": "user", "content": "Is the sky blue?"}],
        response_format={"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}},
        max_tokens=48,
        temperature=0,
    )
    jsonschema.validate(json.loads(shaped.choices[0].message.content or ""), schema)


# -- refusals ---------------------------------------------------------------------------------


def test_refusals_have_their_status_and_the_daemon_keeps_answering(daemon: Running) -> None:
    with pytest.raises(openai.AuthenticationError):
        daemon.client("wrong-token").models.list()
    with pytest.raises(openai.NotFoundError) as unknown:
        daemon.client().chat.completions.create(model="llama-9000", messages=STORY, max_tokens=2)
    assert SMOL in unknown.value.message and "qwen2.5-1.5b-instruct" in unknown.value.message
    bearer = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    url = f"http://127.0.0.1:{daemon.port}"
    with httpx2.Client(base_url=url, headers=bearer, timeout=60) as http:
        malformed = http.post("/v1/chat/completions", content=b'{"model": "x", "messages": [')
        assert malformed.status_code == 400 and "not valid JSON" in malformed.json()["error"]["message"]
        assert http.post("/localsample/stop").status_code == 404  # only on the Unix socket
        good = http.post("/v1/chat/completions", json={"model": SMOL, "messages": STORY, "max_tokens": 2})
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 2


def test_the_socket_is_private_and_needs_no_token(daemon: Running) -> None:
    assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o600 and stat.S_ISSOCK(daemon.socket.stat().st_mode)
    assert stat.S_IMODE(daemon.socket.parent.stat().st_mode) == 0o700
    with daemon.over_socket() as http:
        answer = http.post(
            "/v1/chat/completions",
            json={"model": "haiku", "messages": STORY, "max_tokens": 3},
            headers={"X-Localsample-Client": "socket-test"},
        )
        status = http.get("/localsample/status").json()
    assert answer.status_code == 200 and answer.json()["model"] == SMOL
    assert status["pid"] == daemon.process.pid and status["socket"] == str(daemon.socket)
    assert daemon.audit()[-1]["server"] == "socket-test"


def test_a_second_daemon_is_refused_naming_the_first(daemon: Running) -> None:
    second = daemon.cli("daemon")
    assert second.returncode == 1
    assert f"already runs (pid {daemon.process.pid}, socket {daemon.socket})" in second.stderr
    assert daemon.process.poll() is None and daemon.socket.exists()


def test_daemon_stop_ends_it_and_removes_the_socket(daemon: Running) -> None:
    stopped = daemon.cli("daemon", "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert f"pid {daemon.process.pid}" in stopped.stdout
    assert daemon.process.wait(timeout=20) == 0
    assert not daemon.socket.exists()
    again = daemon.cli("daemon", "stop")
    assert again.returncode == 1 and "no localsample daemon runs" in again.stderr


# -- signals ----------------------------------------------------------------------------------


def test_sigterm_mid_generation_cancels_it_and_exits_cleanly(model_dir: Path) -> None:
    root = Path(tempfile.mkdtemp(prefix="lsd-"))
    running = start_daemon(root, listen=False)
    try:
        body = {"model": SMOL, "messages": STORY, "max_tokens": 4000, "stream": True}
        events: list[str] = []
        with running.over_socket() as http, http.stream("POST", "/v1/chat/completions", json=body) as response:
            for line in response.iter_lines():
                if not line:  # the blank line after each event
                    continue
                events.append(line)
                if len(events) == 3:  # once: a second signal would stop it sooner
                    running.process.send_signal(signal.SIGTERM)
        assert running.process.wait(timeout=20) == 0, running.stderr
        assert '"code":"server_busy"' in events[-2] and events[-1] == "data: [DONE]"
        assert not running.socket.exists()
        assert running.audit()[-1]["decision"] == "cancelled"
        assert "SIGTERM received" in running.stderr
    finally:
        end(running)
        shutil.rmtree(root, ignore_errors=True)


def test_a_second_sigterm_during_the_stop_ends_the_wait_not_the_process(model_dir: Path) -> None:
    """A request whose body is still arriving holds the stop for the whole drain (DRAIN_S);
    a second SIGTERM then cuts the wait short, and the daemon still cleans up and exits 0
    (before, the first signal's handler was gone and the second killed it)."""
    root = Path(tempfile.mkdtemp(prefix="lsd-"))
    running = start_daemon(root, listen=False)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as half_sent:
            half_sent.connect(str(running.socket))
            half_sent.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: localsample\r\n"
                b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
            )
            time.sleep(0.5)  # let the daemon read the headers: the request is open
            running.process.send_signal(signal.SIGTERM)
            wait_for(lambda: "SIGTERM received: cancelling" in running.stderr, running)
            running.process.send_signal(signal.SIGTERM)
            assert running.process.wait(timeout=20) == 0, running.stderr
        assert "SIGTERM received again: stopping now" in running.stderr
        assert "stopped (SIGTERM received)" in running.stderr
        assert not running.socket.exists()
    finally:
        end(running)
        shutil.rmtree(root, ignore_errors=True)


def wait_for(condition: Callable[[], bool], running: Running, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert running.process.poll() is None, running.stderr
        assert time.monotonic() < deadline, running.stderr
        time.sleep(0.02)
