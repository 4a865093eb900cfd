"""Clients attached to a real `localsample daemon` process (the default model): `sample`,
`call` and two `serve` processes driven by SDK hosts hand their generation to it; the
answers keep their exact semantics (stop reasons, maxTokens, progress, tools); the rate
limit of a server counts across hosts; approval is asked on the client's side; cancelling
reaches the daemon; a killed daemon fails the request at once, then the client falls back
in-process and attaches again when a daemon is back; ``daemon = spawn`` starts one that
exits when idle. Slow: processes and a model."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, StdioServerParameters
from mcp.shared.exceptions import MCPError

from localsample.attach import AttachedRuntime, client_runtime
from localsample.errors import DaemonError, RejectedError
from localsample.generation import ChatMessage, GenerationRequest
from localsample.policy import Decision, Pending, edited
from localsample.runtime import Origin, Runtime
from localsample.settings import Settings, load_settings

from .daemon_process import Running, daemon_env, daemon_in, end, start_daemon

pytestmark = [pytest.mark.slow, pytest.mark.anyio]
SMOL = "smollm2-135m-instruct"
SERVER = Path(__file__).parent / "servers" / "sampling_server.py"
CONFIG = """
[servers.limited]
requests_per_minute = 1

[servers.asking]
approve = "ask"
review_response = true
ask_timeout = 60
"""
STORY = GenerationRequest(messages=[ChatMessage("user", "Tell me a long story about a cat.")], max_tokens=200)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def new_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="lsa-"))
    (root / "config.toml").write_text(CONFIG)
    return root


@pytest.fixture(scope="module")
def daemon(model_dir: Path) -> Iterator[Running]:
    with daemon_in(new_root(), False) as running:
        yield running


def settings_of(root: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """This test process's settings, pointed at the daemon's files (so it attaches to it)."""
    for key, value in daemon_env(root).items():
        if key.startswith("LOCALSAMPLE_"):
            monkeypatch.setenv(key, value)
    return load_settings()


def attached(root: Path, monkeypatch: pytest.MonkeyPatch) -> AttachedRuntime:
    runtime = client_runtime(settings_of(root, monkeypatch), "pytest")
    assert isinstance(runtime, AttachedRuntime)
    return runtime


def audit_of(daemon: Running, server: str) -> list[dict[str, object]]:
    return [record for record in daemon.audit() if record["server"] == server]


# -- the CLI, attached ---------------------------------------------------------------------


def test_sample_attaches_without_loading_llama_cpp_and_answers_as_in_process(daemon: Running) -> None:
    args = ["sample", "Name three colours.", "--max-tokens", "9", "--temperature", "0", "--json"]
    command = [sys.executable, "-X", "importtime", "-m", "localsample", *args]
    through = subprocess.run(command, env=daemon.env, capture_output=True, text=True, timeout=120)
    assert through.returncode == 0, through.stderr
    assert f"attached to the localsample daemon (pid {daemon.process.pid}, socket {daemon.socket})" in through.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in through.stderr.splitlines() if "|" in line]
    assert "localsample.attach" in imported and "llama_cpp" not in imported
    alone = daemon.cli(*args, "--no-daemon")
    assert alone.returncode == 0, alone.stderr
    assert "attached" not in alone.stderr
    answer, expected = json.loads(through.stdout), json.loads(alone.stdout)
    assert answer["completion_tokens"] == 9 and answer["stop_reason"] == "maxTokens"
    assert (answer["text"], answer["model"]) == (expected["text"], expected["model"])
    assert audit_of(daemon, "sample")[-1]["completion_tokens"] == 9


def test_call_through_the_daemon_keeps_stop_reasons_progress_and_tool_calls(daemon: Running) -> None:
    def call(*args: str) -> dict[str, Any]:
        done = daemon.cli("call", "--server", f"{sys.executable} {SERVER}", *args, "--protocol", "legacy", "--quiet")
        assert done.returncode == 0, done.stderr
        assert "attached to the localsample daemon" in done.stderr
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    stopped = call("push", "--args", json.dumps({"stop": [" the"], "max_tokens": 60}))["result"]
    assert stopped["stopReason"] == "stopSequence" and " the" not in stopped["content"]["text"]
    pushed = call("push", "--args", json.dumps({"max_tokens": 24, "progress": True}))
    assert pushed["result"]["stopReason"] == "maxTokens"
    assert len(pushed["progress"]) > 1  # progress streamed from the daemon, through the client
    weather = call("forecast", "--arg", "city=Paris")
    calls = weather["content"]
    assert weather["stopReason"] == "toolUse" and isinstance(calls, list)
    assert calls[0]["name"] == "get_weather" and set(calls[0]["input"]) == {"city", "unit"}


@asynccontextmanager
async def host(daemon: Running, name: str = "limited") -> AsyncIterator[Client]:
    """An SDK host running `localsample serve` for the sampling server, under ``name``."""
    args = ["-m", "localsample", "serve", "--server", f"{name}={sys.executable} {SERVER}"]
    async with Client(StdioServerParameters(command=sys.executable, args=args, env=daemon.env)) as client:
        yield client


async def test_two_hosts_share_one_daemon_its_model_and_a_servers_rate_limit(daemon: Running) -> None:
    async with host(daemon) as first, host(daemon) as second:
        listed = json.loads(daemon.cli("ps", "--json").stdout)
        mine = [status for status in listed if status["pid"] == daemon.process.pid]
        assert [m["id"] for m in mine[0]["models"]] == [SMOL]  # one model, loaded once
        assert sorted(c["command"] for c in mine[0]["clients"]).count("serve") == 2
        assert "2 clients attached" in daemon.cli("ps").stdout
        ok = await first.call_tool("write", {"topic": "tea", "max_tokens": 6})
        with pytest.raises(MCPError, match="requests_per_minute"):  # the same server, from the other host
            await second.call_tool("write", {"topic": "tea", "max_tokens": 6})
    assert not ok.is_error and json.loads(ok.content[0].text)["stopReason"] == "maxTokens"  # type: ignore[union-attr]
    decisions = [record["decision"] for record in audit_of(daemon, "limited")]
    assert decisions[-2:] == ["approved", "rejected"]


async def test_requests_from_two_hosts_are_decoded_in_shared_steps(daemon: Running) -> None:
    async with host(daemon, "one") as first, host(daemon, "two") as second:
        results = []

        async def write(client: Client) -> None:
            results.append(await client.call_tool("write", {"topic": "the sea", "max_tokens": 48}))

        async with anyio.create_task_group() as group:
            group.start_soon(write, first)
            group.start_soon(write, second)
    assert len(results) == 2 and not any(result.is_error for result in results)
    status = json.loads(daemon.cli("ps", "--json").stdout)
    model = next(s for s in status if s["pid"] == daemon.process.pid)["models"][0]
    assert model["widest_step"] >= 2 and model["running"] == 0 and model["queued"] == 0


# -- in this process, attached ---------------------------------------------------------------


class Person:
    """An asker that answers as told and remembers what it was shown."""

    unavailable = ""

    def __init__(self, approve: bool, max_tokens: int | None = None, review: str | None = None) -> None:
        self.approves, self.max_tokens, self.reviewed_as = approve, max_tokens, review
        self.shown: list[Pending] = []
        self.responses: list[str] = []

    def available(self) -> bool:
        return True

    async def approve(self, pending: Pending) -> Decision:
        self.shown.append(pending)
        change = edited(pending.request, None, self.max_tokens, None) if self.max_tokens else None
        return Decision(self.approves, "test person", "as told", change, human=True)

    async def review(self, pending: Pending, text: str) -> str | None:
        self.responses.append(text)
        return self.reviewed_as


async def test_approval_and_review_are_asked_where_the_client_is(
    daemon: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = attached(daemon.root, monkeypatch)
    person = Person(True, max_tokens=3, review="reviewed text")
    answer = await runtime.answer(STORY, Origin("asking", "a1"), ask=person)
    assert [p.model for p in person.shown] == [SMOL] and person.shown[0].request.max_tokens == 200
    assert answer.completion.completion_tokens == 3  # the person's edit reached the daemon
    assert person.responses and answer.completion.text == "reviewed text"
    with pytest.raises(RejectedError, match="test person"):
        await runtime.answer(STORY, Origin("asking", "a2"), ask=Person(False))
    records = audit_of(daemon, "asking")
    assert [(r["request_id"], r["decision"], r["by"]) for r in records[-2:]] == [
        ("a1", "approved", "test person"),
        ("a2", "rejected", "test person"),
    ]


async def test_cancelling_a_request_cancels_it_in_the_daemon(daemon: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = attached(daemon.root, monkeypatch)
    first_text = anyio.Event()

    async def on_text(_text: str, _tokens: int) -> None:
        first_text.set()

    async with anyio.create_task_group() as group:
        group.start_soon(lambda: runtime.answer(STORY, Origin("cancelled", "c1"), on_text=on_text))
        await first_text.wait()
        group.cancel_scope.cancel()
    with anyio.fail_after(20):
        while not audit_of(daemon, "cancelled"):
            await anyio.sleep(0.05)
    assert audit_of(daemon, "cancelled")[-1]["decision"] == "cancelled"


async def test_a_killed_daemon_fails_the_request_then_the_client_falls_back_and_reattaches(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "localsample")
    root = new_root()
    running = start_daemon(root, False)
    try:
        runtime = attached(root, monkeypatch)
        first_text = anyio.Event()

        async def on_text(_text: str, _tokens: int) -> None:
            first_text.set()

        async def kill_at_first_text() -> None:
            await first_text.wait()
            running.process.send_signal(signal.SIGKILL)

        failure: DaemonError | None = None
        async with anyio.create_task_group() as group:
            group.start_soon(kill_at_first_text)
            try:
                await runtime.answer(STORY, Origin("k", "k1"), on_text=on_text)
            except DaemonError as exc:
                failure = exc
        assert failure is not None and f"(pid {running.process.pid}, socket" in str(failure)
        assert "went away while answering" in str(failure)
        running.process.wait(timeout=10)
        short = GenerationRequest(messages=[ChatMessage("user", "Hi")], max_tokens=4)
        answer = await runtime.answer(short, Origin("k", "k2"))  # in this process now
        assert answer.completion.completion_tokens == 4 and not runtime.attached
        assert f"no localsample daemon answers on {root / 'state' / 'run' / 'daemon.sock'}: generating in-process" in (
            caplog.text
        )
        running = start_daemon(root, False)
        await runtime.answer(short, Origin("k", "k3"))
        assert (
            runtime.attached and f"attached again to the localsample daemon (pid {running.process.pid}" in caplog.text
        )
        assert [r["request_id"] for r in running.audit() if r["server"] == "k"][-1] == "k3"
        await runtime.aclose()
    finally:
        end(running)
        shutil.rmtree(root, ignore_errors=True)


def test_daemon_spawn_starts_one_that_exits_when_no_client_is_left(model_dir: Path) -> None:
    root = new_root()
    env = daemon_env(root) | {"LOCALSAMPLE_DAEMON": "spawn", "LOCALSAMPLE_DAEMON_IDLE_EXIT": "0.02"}
    sock = root / "state" / "run" / "daemon.sock"
    try:
        command = [sys.executable, "-m", "localsample", "sample", "Hi", "--max-tokens", "3", "--json"]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "attached to the localsample daemon" in done.stderr and json.loads(done.stdout)["completion_tokens"] == 3
        deadline = time.monotonic() + 60
        while sock.exists():  # no client left: it exits within its idle time plus a reap interval
            assert time.monotonic() < deadline, (root / "state" / "run" / "daemon.log").read_text()
            time.sleep(0.2)
        log = (root / "state" / "run" / "daemon.log").read_text()
        assert "no clients for 0.02 minutes (daemon_idle_exit)" in log
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_daemon_never_and_no_daemon_stay_in_process(daemon: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_of(daemon.root, monkeypatch)
    never = client_runtime(settings.model_copy(update={"daemon": "never"}), "pytest")
    assert type(never) is Runtime
    assert os.environ["LOCALSAMPLE_STATE_DIR"] == str(daemon.root / "state")


def test_bad_input_on_the_attach_routes_is_refused_and_the_daemon_keeps_serving(daemon: Running) -> None:
    with daemon.over_socket() as http:
        body = {"model": "auto", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        refused = http.post("/v1/chat/completions", json=body | {"localsample": {"cost": 7}})
        events = [json.loads(line[6:]) for line in refused.text.splitlines() if line.startswith("data: {")]
        assert events[-1]["localsample"]["error"]["kind"] == "RequestError"
        assert "localsample.cost" in events[-1]["localsample"]["error"]["problem"]
        assert http.post("/localsample/asks/no-such-question", json={"approved": True}).status_code == 404
        assert http.post("/localsample/attach", content=b"not json").status_code == 400
        answered = http.post("/v1/chat/completions", json=body | {"localsample": {"server": "fine", "text": False}})
        last = json.loads([line for line in answered.text.splitlines() if line.startswith("data: {")][-1][6:])
        assert last["localsample"]["answer"]["completion_tokens"] == 2
