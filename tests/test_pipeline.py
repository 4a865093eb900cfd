"""The request pipeline (``Runtime.answer``) and the MCP error mapping, on FakeGenerators:
selection, limits, approval, audit decisions and the codes a server receives. Fast: no
model is loaded (what generation itself does is tested on the real model elsewhere)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from localsample import GenerationRequest, Origin, Runtime
from localsample.errors import (
    INVALID_PARAMS,
    SERVER_BUSY,
    USER_REJECTED,
    BusyError,
    RejectedError,
    UnknownModelError,
)
from localsample.generation import ChatMessage
from localsample.sampling import SamplingHandler
from localsample.selection import Preferences
from localsample.settings import ServerSettings, Settings

from .conftest import FakeGenerator, fake_runtime, real_model_dir
from .servers.sampling_server import server

pytestmark = pytest.mark.anyio
TEST_CATALOG = Path(__file__).parent / "catalog.toml"
HELLO = GenerationRequest(messages=[ChatMessage("user", "hello")], max_tokens=5)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def runtime(tmp_path: Path, **settings: Any) -> Runtime:
    base = Settings(model_dir=real_model_dir(), catalog_path=TEST_CATALOG, log_dir=tmp_path / "logs", **settings)
    return fake_runtime(base, TEST_CATALOG)


def audit(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (tmp_path / "logs" / "audit.jsonl").read_text().splitlines()]


async def push(rt: Runtime, **arguments: Any) -> dict[str, Any]:
    async with Client(server, sampling_callback=SamplingHandler(rt, server="test"), mode="legacy") as client:
        result = await client.call_tool("push", {"max_tokens": 6, **arguments})
    return json.loads(result.content[0].text)  # type: ignore[no-any-return, union-attr]


async def test_answer_runs_the_whole_pipeline_and_audits_it(tmp_path: Path) -> None:
    rt = runtime(tmp_path)
    streamed: list[str] = []

    async def on_text(text: str, _tokens: int) -> None:
        streamed.append(text)

    answer = await rt.answer(HELLO, Origin("lib", "1"), prefs=Preferences(hints=("gemma",)), on_text=on_text)
    assert answer.completion.model == "gemma3-270m" and "hint 'gemma'" in answer.reason
    assert answer.completion.text == "one two three four five" and "".join(streamed) == answer.completion.text
    assert answer.completion.stop_reason == "maxTokens"
    [line] = audit(tmp_path)
    assert line["server"] == "lib" and line["decision"] == "approved" and line["by"] == "policy"
    assert line["model"] == "gemma3-270m" and line["completion_tokens"] == 5
    rt.close()


async def test_stop_sequences_and_explicit_models_go_through(tmp_path: Path) -> None:
    rt = runtime(tmp_path)
    request = GenerationRequest(messages=[ChatMessage("user", "hi")], max_tokens=20, stop=("four",))
    answer = await rt.answer(request, Origin("lib", "2"), model="smollm2-135m-instruct")
    assert answer.completion.text == "one two three " and answer.completion.stop_reason == "stopSequence"
    assert answer.reason == "named explicitly ('smollm2-135m-instruct')"
    with pytest.raises(UnknownModelError):
        await rt.answer(request, Origin("lib", "3"), model="no-such-model")
    assert [line["decision"] for line in audit(tmp_path)] == ["approved", "error"]
    rt.close()


async def test_every_refusal_has_its_own_audit_decision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FakeGenerator, "delay", 0.02)
    rt = runtime(tmp_path, queue_limit=1, servers={"denied": ServerSettings(approve="deny")})
    with pytest.raises(RejectedError):
        await rt.answer(HELLO, Origin("denied", "1"))
    long = GenerationRequest(messages=[ChatMessage("user", "hi")], max_tokens=100)
    async with anyio.create_task_group() as group:
        group.start_soon(rt.answer, long, Origin("lib", "2"))
        await anyio.sleep(0.1)
        with pytest.raises(BusyError, match="has 1 requests running and 0 waiting"):
            await rt.answer(HELLO, Origin("lib", "3"))
        group.cancel_scope.cancel()
    decisions = {line["request_id"]: line["decision"] for line in audit(tmp_path)}
    assert decisions == {"1": "rejected", "2": "cancelled", "3": "busy"}
    rt.close()


async def test_mcp_codes_for_refusals(tmp_path: Path) -> None:
    rt = runtime(tmp_path, servers={"test": ServerSettings(requests_per_minute=1)})
    first = await push(rt)
    assert first["result"]["content"]["text"] == "one two three four five six"
    limited = await push(rt)
    assert limited["error"]["code"] == USER_REJECTED and "requests_per_minute" in limited["error"]["message"]
    rt.close()


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({"max_tokens": 0}, "maxTokens must be positive (got 0)"),
        ({"max_tokens": -5}, "maxTokens must be positive (got -5)"),
        ({"empty": True}, "messages is empty"),
        ({"image": True}, "messages[1].content.data is not a readable image (8 bytes declared image/png"),
        ({"temperature": 3.5}, "temperature must be between 0 and 2 (got 3.5)"),
        ({"metadata": {"top_k": "many"}}, "metadata.top_k must be a number"),
        ({"max_tokens": 9000}, "maxTokens 9000 of context"),
        ({"stop": ["x"] * 33}, "stopSequences has 33 entries; at most 32"),
        ({"stop": ["y" * 300]}, "an entry of 300 characters; at most 256"),
        ({"metadata": {"top_p": -1}}, "metadata.top_p is out of range: input should be greater than 0"),
        ({"metadata": {"min_p": 5}}, "metadata.min_p is out of range"),
        ({"metadata": {"repeat_penalty": -1e308}}, "metadata.repeat_penalty is out of range"),
        ({"metadata": {"top_k": 10**12}}, "metadata.top_k is out of range"),
        ({"metadata": {"seed": 2**70}}, "metadata.seed is out of range"),
    ],
)
async def test_bad_requests_get_invalid_params_and_are_audited(
    tmp_path: Path, arguments: dict[str, Any], expected: str
) -> None:
    rt = runtime(tmp_path)
    report = await push(rt, **arguments)
    assert report["error"]["code"] == INVALID_PARAMS
    assert expected in report["error"]["message"] and "fix:" in report["error"]["message"]
    [line] = audit(tmp_path)
    assert line["decision"] == "error" and expected in line["error"]
    good = await push(rt)  # and the next request is served
    assert good["result"]["stopReason"] == "maxTokens"
    rt.close()


async def test_busy_reaches_the_server_as_its_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FakeGenerator, "delay", 0.02)
    rt = runtime(tmp_path, queue_limit=1)
    reports: list[dict[str, Any]] = []

    async def one(max_tokens: int) -> None:
        reports.append(await push(rt, max_tokens=max_tokens))

    async with anyio.create_task_group() as group:
        group.start_soon(one, 50)
        await anyio.sleep(0.2)
        group.start_soon(one, 3)
    busy = [r for r in reports if "error" in r]
    assert len(busy) == 1 and busy[0]["error"]["code"] == SERVER_BUSY
    assert "retry later" in busy[0]["error"]["message"]
    rt.close()


@pytest.mark.slow
def test_the_readme_library_example_runs_as_written(model_dir: Path, tmp_path: Path) -> None:
    import re
    import subprocess
    import sys

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("## Use it as a library") :]
    [code] = re.findall(r"```python\n(.*?)```", section[: section.index("\n## ", 5)], re.S)
    script = tmp_path / "example.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    # The reason ends the line: the hint matched the model (not "named", which only an explicit
    # model gives). Only the tail is checked: the generated text before it may say anything.
    assert re.search(r"hint 'haiku' matched '[^']+'\s*$", proc.stdout), proc.stdout
    [line] = [json.loads(x) for x in (tmp_path / "logs" / "audit.jsonl").read_text().splitlines()]
    assert line["server"] == "my-app" and line["decision"] == "approved"


async def test_a_request_waiting_past_queue_timeout_gets_busy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FakeGenerator, "delay", 0.02)
    rt = runtime(tmp_path, parallel=1, queue_timeout=0.2)
    long = GenerationRequest(messages=[ChatMessage("user", "hi")], max_tokens=100)
    async with anyio.create_task_group() as group:
        group.start_soon(rt.answer, long, Origin("lib", "1"))
        await anyio.sleep(0.05)
        with anyio.fail_after(5), pytest.raises(BusyError, match=r"waited 0\.2 s for a free slot"):
            await rt.answer(HELLO, Origin("lib", "2"))
    assert {line["request_id"]: line["decision"] for line in audit(tmp_path)} == {"1": "approved", "2": "busy"}
    rt.close()


async def test_a_model_that_fails_to_load_is_audited_and_its_path_stays_local(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 secret bytes of some other file")
    catalog = tmp_path / "models.toml"
    catalog.write_text(f'[[models]]\nid = "junk"\nsource = "{junk}"\n')
    settings = Settings(
        model_dir=real_model_dir(),
        catalog_path=catalog,
        log_dir=tmp_path / "logs",
        servers={"test": ServerSettings(model="junk")},
    )
    rt = fake_runtime(settings, catalog)
    report = await push(rt)
    message = report["error"]["message"]
    assert "could not be loaded" in message and "localsample doctor" in message
    assert str(tmp_path) not in message and "secret" not in message  # the server learns no local detail
    [line] = audit(tmp_path)
    assert line["decision"] == "load_failed" and str(junk) in line["error"]  # the user's own trail has it
    rt.close()


def test_directories_holding_prompts_are_private_whatever_the_umask(tmp_path: Path) -> None:
    import os
    import stat

    from localsample.audit import AuditLog, AuditRecord

    old = os.umask(0)
    try:
        log = AuditLog(tmp_path / "state" / "log" / "audit.jsonl", max_bytes=10**6, backups=1, include_text=True)
        log.write(AuditRecord("s", "1", decision="approved"))
        rt = runtime(tmp_path, state_dir=tmp_path / "state2")
        rt.publishing = True
        rt.publish_status()
    finally:
        os.umask(old)
    for folder in (tmp_path / "state", tmp_path / "state" / "log", tmp_path / "state2", tmp_path / "state2" / "run"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    assert stat.S_IMODE((tmp_path / "state" / "log" / "audit.jsonl").stat().st_mode) == 0o600
    rt.close()
