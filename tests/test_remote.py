"""Remote catalog entries against real OpenAI-compatible engines started here:
llama-cpp-python's own server (``python -m llama_cpp.server``, twice for replicas) and a
localsample daemon. Exact stop reasons and maxTokens, cancellation that reaches the
engine, a wrong key, failover from a dead replica before the first token and a clear
error after it, balancing over replicas, and sampling through `call`. Slow: processes."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx2
import jsonschema
import pytest
from mcp import Client, StdioServerParameters

from localsample.doctor import Level, diagnose, healthy
from localsample.errors import EngineError
from localsample.generation import ChatMessage, Completion, GenerationRequest, OnText, ToolSpec
from localsample.manage import rows
from localsample.remote import RemoteGenerator
from localsample.runtime import Origin, Runtime
from localsample.settings import load_settings

from .conftest import real_model_dir
from .daemon_process import TOKEN, daemon_env, end, free_port, start_daemon

pytestmark = [pytest.mark.slow, pytest.mark.anyio]
KEY = "engine-test-key"
SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SERVER = Path(__file__).parent / "servers" / "sampling_server.py"
STORY = [ChatMessage("user", "Tell me a long story about a cat.")]
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Engine:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def start_engine(root: Path, name: str) -> Engine:
    """`python -m llama_cpp.server` on the default model, on a free loopback port, with a key."""
    port = free_port()
    log = root / f"{name}.log"
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(real_model_dir() / SMOL_FILE)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--api_key", KEY]
    command += ["--interrupt_requests", "False"]  # queue concurrent requests (by default one cuts the other)
    env = dict(os.environ) | {"PYTHONUNBUFFERED": "1"}  # its "Disconnected from client" is a print()
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=out, env=env)
    engine = Engine(process, f"http://127.0.0.1:{port}/v1", log)
    deadline = time.monotonic() + 90
    while True:
        assert process.poll() is None, engine.text()[-2000:]
        try:
            if httpx2.get(engine.url + "/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200:
                return engine
        except httpx2.HTTPError:
            pass
        assert time.monotonic() < deadline, engine.text()[-2000:]
        time.sleep(0.2)


def stop_engine(engine: Engine) -> None:
    if engine.process.poll() is None:
        engine.process.terminate()
        engine.process.wait(timeout=20)


@pytest.fixture(scope="module")
def engines(model_dir: Path) -> Iterator[list[Engine]]:
    root = Path(tempfile.mkdtemp(prefix="lse-"))
    started = [start_engine(root, "a"), start_engine(root, "b")]
    try:
        yield started
    finally:
        for engine in started:
            stop_engine(engine)
        shutil.rmtree(root, ignore_errors=True)


def catalog(isolated: Path, *urls: str, key_env: str = "SMOL_KEY") -> None:
    """A user catalog with one remote entry, ``smol-remote`` (alias ``far``), over ``urls``."""
    listed = ", ".join(f'"{url}"' for url in urls)
    (isolated / "models.toml").write_text(
        f'[[models]]\nid = "smol-remote"\nendpoints = [{listed}]\nremote_model = "smol"\n'
        f'api_key_env = "{key_env}"\naliases = ["far"]\n'
    )


def request(max_tokens: int, stop: tuple[str, ...] = ()) -> GenerationRequest:
    return GenerationRequest(messages=STORY, max_tokens=max_tokens, temperature=0.0, stop=stop)


async def test_a_remote_model_answers_with_exact_max_tokens_and_stop_sequences(
    engines: list[Engine], isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog(isolated, engines[0].url)
    monkeypatch.setenv("SMOL_KEY", KEY)
    runtime = Runtime(load_settings())
    counted = await runtime.answer(request(9), Origin("t", "1"), model="far")
    assert counted.completion.completion_tokens == 9 and counted.completion.stop_reason == "maxTokens"
    assert counted.completion.engine == engines[0].url and counted.completion.model == "smol-remote"
    stopped = await runtime.answer(request(80, (" the",)), Origin("t", "2"), model="far")
    assert stopped.completion.stop_reason == "stopSequence" and stopped.completion.stop_sequence == " the"
    assert " the" not in stopped.completion.text and stopped.completion.text
    records = [json.loads(line) for line in (isolated / "logs" / "audit.jsonl").read_text().splitlines()]
    assert [r["endpoint"] for r in records] == [engines[0].url] * 2


async def test_cancelling_closes_the_stream_and_the_engine_stops(
    engines: list[Engine], isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog(isolated, engines[1].url)
    monkeypatch.setenv("SMOL_KEY", KEY)
    runtime = Runtime(load_settings())
    first_text = anyio.Event()

    async def on_text(_text: str, _tokens: int) -> None:
        first_text.set()

    before = engines[1].text().count("Disconnected from client")
    async with anyio.create_task_group() as group:
        group.start_soon(lambda: runtime.answer(request(400), Origin("t", "c"), model="far", on_text=on_text))
        await first_text.wait()
        group.cancel_scope.cancel()
    with anyio.fail_after(20):  # the engine logs the disconnect and stops generating
        while engines[1].text().count("Disconnected from client") == before:
            await anyio.sleep(0.05)


async def test_a_wrong_key_is_an_error_naming_the_variable(
    engines: list[Engine], isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog(isolated, engines[0].url)
    monkeypatch.setenv("SMOL_KEY", "not-the-key")
    with pytest.raises(EngineError, match="refused the key") as failed:
        await Runtime(load_settings()).answer(request(4), Origin("t", "k"), model="far")
    assert "set SMOL_KEY to a key it accepts" in str(failed.value)


async def test_replicas_balance_and_a_dead_one_is_skipped_before_the_first_token(
    engines: list[Engine], isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    catalog(isolated, dead, engines[0].url, engines[1].url)
    monkeypatch.setenv("SMOL_KEY", KEY)
    runtime = Runtime(load_settings())
    answers = []

    async def one(i: int) -> None:
        answers.append(await runtime.answer(request(6), Origin("t", f"b{i}"), model="far"))

    async with anyio.create_task_group() as group:
        for i in range(4):
            group.start_soon(one, i)
    used = [str(a.completion.engine) for a in answers]
    assert sorted(used) == sorted([engines[0].url] * 2 + [engines[1].url] * 2)  # least in flight, dead skipped
    generator = runtime.pool.generator(runtime.catalog.get("far"))
    assert isinstance(generator, RemoteGenerator)
    states = {replica["url"]: replica["state"] for replica in generator.status()}
    assert states[dead].startswith("failing") and states[engines[0].url] == "ok"


async def test_a_replica_killed_mid_run_fails_its_answer_clearly_and_what_waited_moves_on(
    engines: list[Engine], isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replicas k (killed) and engines[0]: a is answering on k, b on the other, c waits on k
    behind a (the server answers one at a time). Killing k fails a, which had text, with an
    error naming k; c, which had none yet, is answered by the other replica."""
    root = Path(tempfile.mkdtemp(prefix="lsk-"))
    k = start_engine(root, "k")
    try:
        catalog(isolated, k.url, engines[0].url)
        monkeypatch.setenv("SMOL_KEY", KEY)
        runtime = Runtime(load_settings())
        remote = runtime.pool.generator(runtime.catalog.get("far"))
        assert isinstance(remote, RemoteGenerator)
        first_text = anyio.Event()
        results: dict[str, Completion | EngineError] = {}

        async def on_text(_text: str, _tokens: int) -> None:
            first_text.set()

        async def one(name: str, tokens: int, show: OnText | None = None) -> None:
            try:
                answer = await runtime.answer(request(tokens), Origin("t", name), model="far", on_text=show)
                results[name] = answer.completion
            except EngineError as exc:
                results[name] = exc

        async def until(*in_flight: int) -> None:
            with anyio.fail_after(20):
                while tuple(r.in_flight for r in remote.replicas) != in_flight:
                    await anyio.sleep(0.01)

        async with anyio.create_task_group() as group:
            group.start_soon(one, "a", 400, on_text)  # k: the first of equally idle replicas
            await first_text.wait()
            group.start_soon(one, "b", 100)  # the other: fewest in flight
            await until(1, 1)
            group.start_soon(one, "c", 5)  # k: equally busy, equally used, listed first
            await until(2, 1)
            await anyio.sleep(0.5)  # c's request has reached k, which holds it behind a
            k.process.kill()
        a, c = results["a"], results["c"]
        assert isinstance(a, EngineError) and f"the engine at {k.url} failed while answering" in str(a)
        assert isinstance(c, Completion) and c.engine == engines[0].url and c.completion_tokens == 5
        assert isinstance(results["b"], Completion) and results["b"].engine == engines[0].url
        assert remote.replicas[0].sent == 2  # c went to k first, then moved on
        assert remote.status()[0]["state"].startswith("failing")
    finally:
        stop_engine(k)
        shutil.rmtree(root, ignore_errors=True)


async def test_another_localsample_daemon_is_an_endpoint(
    model_dir: Path, isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = Path(tempfile.mkdtemp(prefix="lsr-"))
    daemon = start_daemon(root)
    try:
        (isolated / "models.toml").write_text(
            f'[[models]]\nid = "team-box"\nendpoint = "http://127.0.0.1:{daemon.port}/v1"\n'
            'remote_model = "smollm2-135m-instruct"\napi_key_env = "TEAM_KEY"\n'
        )
        monkeypatch.setenv("TEAM_KEY", TOKEN)
        runtime = Runtime(load_settings())
        answer = await runtime.answer(request(40, ("cat",)), Origin("t", "r"), model="team-box")
        assert answer.completion.stop_reason in ("stopSequence", "endTurn", "maxTokens")
        exact = await runtime.answer(request(7), Origin("t", "r2"), model="team-box")
        assert exact.completion.completion_tokens == 7 and exact.completion.stop_reason == "maxTokens"
        assert daemon.audit()[-1]["completion_tokens"] == 7  # the box audits it too
        tool = ToolSpec("weather", "Weather in a city", WEATHER_SCHEMA)
        asked = GenerationRequest(
            messages=[ChatMessage("user", "Weather in Paris?")],
            max_tokens=64,
            temperature=0.0,
            tools=(tool,),
            tool_choice="required",
        )
        called = await runtime.answer(asked, Origin("t", "r3"), model="team-box")
        assert called.completion.stop_reason == "toolUse" and called.completion.tool_calls[0].name == "weather"
        jsonschema.validate(dict(called.completion.tool_calls[0].arguments), WEATHER_SCHEMA)
    finally:
        end(daemon)
        shutil.rmtree(root, ignore_errors=True)


def test_call_answers_a_servers_sampling_with_the_remote_model(
    engines: list[Engine], isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog(isolated, engines[0].url)
    (isolated / "config.toml").write_text('[servers."*"]\nmodel = "smol-remote"\n')
    env = daemon_env(isolated) | {"SMOL_KEY": KEY, "LOCALSAMPLE_MODEL_DIR": str(real_model_dir())}
    args = ["call", "--server", f"{sys.executable} {SERVER}", "push", "--protocol", "legacy", "--quiet"]
    args += ["--args", json.dumps({"max_tokens": 60, "stop": [" the"]})]
    done = subprocess.run([sys.executable, "-m", "localsample", *args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)["result"]
    assert result["model"] == "smol-remote" and result["stopReason"] == "stopSequence"


def test_doctor_checks_each_endpoint(engines: list[Engine], isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    catalog(isolated, engines[0].url, dead)
    monkeypatch.setenv("SMOL_KEY", KEY)
    checks = {c.what: c for c in diagnose() if c.what.startswith("smol-remote")}
    reached = next(c for what, c in checks.items() if engines[0].url in what)
    assert reached.level is not Level.ERROR and "answers" in reached.what  # llama_cpp.server lists its file name
    assert next(c for what, c in checks.items() if dead in what).level is Level.ERROR
    row = next(r for r in rows(Runtime(load_settings())) if r.id == "smol-remote")  # `models list`
    assert row.status == "remote: 1/2 endpoints answer" and row.endpoints is not None
    assert [e["state"].split(" ")[0] for e in row.endpoints] == ["ok", "failing"]
    monkeypatch.setenv("SMOL_KEY", "wrong")
    refused = [c for c in diagnose() if c.what.startswith("smol-remote") and "refused the key" in c.what]
    assert refused and refused[0].fix == "set SMOL_KEY to a key it accepts" and not healthy(refused)


async def test_serve_answers_a_hosts_server_with_the_remote_model(
    engines: list[Engine], isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog(isolated, engines[1].url)
    (isolated / "config.toml").write_text('[servers."*"]\nmodel = "smol-remote"\n')
    env = daemon_env(isolated) | {"SMOL_KEY": KEY, "LOCALSAMPLE_MODEL_DIR": str(real_model_dir())}
    args = ["-m", "localsample", "serve", "--server", f"{sys.executable} {SERVER}"]
    async with Client(StdioServerParameters(command=sys.executable, args=args, env=env)) as client:
        result = await client.call_tool("write", {"topic": "tea", "max_tokens": 7})
    sampled = json.loads(result.content[0].text)  # type: ignore[union-attr]
    assert sampled["model"] == "smol-remote" and sampled["stopReason"] == "maxTokens"


class FailingEngine(http.server.BaseHTTPRequestHandler):
    """What a real engine cannot be made to do on demand: answer every request with a 503."""

    def do_POST(self) -> None:
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error": {"message": "overloaded", "type": "server_error"}}')

    def log_message(self, *args: object) -> None:
        return None


async def test_a_5xx_before_the_first_token_fails_over_to_the_next_replica(
    engines: list[Engine], isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FailingEngine)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    try:
        failing = f"http://127.0.0.1:{stub.server_address[1]}/v1"
        catalog(isolated, failing, engines[0].url)
        monkeypatch.setenv("SMOL_KEY", KEY)
        runtime = Runtime(load_settings())
        answer = await runtime.answer(request(5), Origin("t", "f"), model="far")
        assert answer.completion.engine == engines[0].url and answer.completion.completion_tokens == 5
        generator = runtime.pool.generator(runtime.catalog.get("far"))
        assert isinstance(generator, RemoteGenerator)
        assert generator.status()[0]["state"].startswith("failing (InternalServerError")
    finally:
        stub.shutdown()
