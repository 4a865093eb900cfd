"""Guardrails, approval and the audit trail: every policy path, with real terminal input
(a pty), approval through elicitation with a real SDK client as host, and audit lines."""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pexpect
import pytest
from mcp import Client, StdioServerParameters, types
from mcp.client.session import ClientRequestContext

from localsample.audit import AuditLog, AuditRecord
from localsample.errors import RejectedError, RequestError
from localsample.generation import ChatMessage, GenerationRequest
from localsample.policy import Decision, Limits, Pending
from localsample.runtime import Runtime
from localsample.sampling import SamplingHandler
from localsample.settings import ServerSettings, Settings

from .conftest import fake_runtime, real_model_dir
from .servers.sampling_server import server

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parent.parent
DOWNSTREAM = f"{sys.executable} {ROOT / 'tests' / 'servers' / 'sampling_server.py'}"
REQUEST = GenerationRequest(messages=[ChatMessage("user", "hi")], max_tokens=50)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limits(**server: Any) -> tuple[Limits, Clock]:
    clock = Clock()
    return Limits(Settings(servers={"w": ServerSettings(**server)}), clock), clock


def test_requests_per_minute_is_exact_at_the_boundary() -> None:
    lim, clock = limits(requests_per_minute=3)
    for _ in range(3):
        lim.check("w", REQUEST)
        clock.now += 1
    with pytest.raises(RejectedError) as info:
        lim.check("w", REQUEST)
    assert "3 sampling requests in the last minute (limit 3)" in str(info.value)
    assert "servers.w.requests_per_minute" in str(info.value)
    clock.now = 1000.0 + 59.999  # the first request is still inside the minute
    with pytest.raises(RejectedError):
        lim.check("w", REQUEST)
    clock.now = 1000.0 + 60.0  # exactly a minute later it has left the window
    lim.check("w", REQUEST)
    lim.check("other", REQUEST)  # limits are per server (other has no limit)


def test_tokens_per_minute_is_exact_at_the_boundary() -> None:
    lim, clock = limits(tokens_per_minute=100)
    lim.check("w", REQUEST)
    lim.record_tokens("w", 99)
    lim.check("w", REQUEST)  # 99 < 100
    lim.record_tokens("w", 1)
    with pytest.raises(RejectedError, match=r"generated 100 tokens in the last minute \(limit 100\)"):
        lim.check("w", REQUEST)
    clock.now += 60
    lim.check("w", REQUEST)


def test_max_tokens_cap_clamps_or_rejects() -> None:
    lim, _ = limits(max_tokens=20)
    assert lim.check("w", REQUEST).max_tokens == 20
    assert lim.check("w", GenerationRequest(messages=REQUEST.messages, max_tokens=5)).max_tokens == 5
    strict, _ = limits(max_tokens=20, over_max_tokens="reject")
    with pytest.raises(RequestError, match="maxTokens 50 is over the cap of 20 for server 'w'") as info:
        strict.check("w", REQUEST)
    assert "servers.w.max_tokens" in str(info.value)


def make_runtime(log_dir: Path, **policy: Any) -> Runtime:
    settings = Settings(
        model_dir=real_model_dir(),
        catalog_path=log_dir / "none.toml",
        log_dir=log_dir,
        servers={"test": ServerSettings(**policy)},
    )
    return fake_runtime(settings)


async def push(runtime: Runtime, ask: Any = None, **arguments: Any) -> dict[str, Any]:
    handler = SamplingHandler(runtime, server="test", ask=ask)
    async with Client(server, sampling_callback=handler, mode="legacy") as client:
        result = await client.call_tool("push", {"max_tokens": 6, **arguments})
    return json.loads(result.content[0].text)  # type: ignore[no-any-return, union-attr]


def audit_lines(log_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (log_dir / "audit.jsonl").read_text().splitlines()]


@pytest.fixture
def log_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "logs"


async def test_deny_rejects_with_code_minus_one_naming_the_setting(log_dir: Path) -> None:
    report = await push(make_runtime(log_dir, approve="deny"))
    assert report["error"]["code"] == -1
    expected = "rejected by the policy: approve = deny for server 'test' (servers.test.approve)"
    assert expected in report["error"]["message"]
    [line] = audit_lines(log_dir)
    assert line["decision"] == "rejected" and line["by"] == "policy" and line["model"] == "smollm2-135m-instruct"
    assert "completion_tokens" not in line


async def test_ask_without_a_human_falls_back(log_dir: Path) -> None:
    denied = await push(make_runtime(log_dir, approve="ask"))
    assert denied["error"]["code"] == -1 and "there is no terminal" in denied["error"]["message"]
    allowed = await push(make_runtime(log_dir, approve="ask", ask_fallback="auto"))
    assert allowed["result"]["model"] == "smollm2-135m-instruct"


class Silent:
    """A human who never answers."""

    unavailable = "nobody is there"

    def available(self) -> bool:
        return True

    async def approve(self, pending: Pending) -> Decision:
        await anyio.sleep_forever()
        raise AssertionError

    async def review(self, pending: Pending, text: str) -> str | None:
        return text


async def test_an_unanswered_request_times_out_and_is_rejected(log_dir: Path) -> None:
    with anyio.fail_after(20):
        report = await push(make_runtime(log_dir, approve="ask", ask_timeout=0.5), ask=Silent())
    assert report["error"]["code"] == -1
    assert "rejected by the timeout: no answer within 0.5 s" in report["error"]["message"]
    assert audit_lines(log_dir)[-1]["by"] == "timeout"


async def test_rate_limit_through_the_handler_and_the_audit_trail(log_dir: Path) -> None:
    runtime = make_runtime(log_dir, requests_per_minute=2)
    first, second, third = [await push(runtime) for _ in range(3)]
    assert "result" in first and "result" in second
    assert third["error"]["code"] == -1 and "requests_per_minute" in third["error"]["message"]
    lines = audit_lines(log_dir)
    assert [line["decision"] for line in lines] == ["approved", "approved", "rejected"]
    good = lines[0]
    for key in (
        "time",
        "server",
        "request_id",
        "protocol",
        "by",
        "model",
        "reason",
        "prompt_tokens",
        "completion_tokens",
        "time_to_first_token",
        "duration",
        "stop_reason",
    ):
        assert key in good, key
    assert good["protocol"] == "2025-11-25" and good["completion_tokens"] == 6 and good["stop_reason"] == "maxTokens"
    assert "messages" not in good and "response" not in good  # text only when enabled
    assert stat.S_IMODE((log_dir / "audit.jsonl").stat().st_mode) == 0o600


async def test_audit_text_is_written_only_when_enabled(log_dir: Path) -> None:
    runtime = make_runtime(log_dir)
    runtime.audit = AuditLog(log_dir / "audit.jsonl", max_bytes=10**6, backups=1, include_text=True)
    report = await push(runtime, system="Be brief.")
    line = audit_lines(log_dir)[-1]
    assert line["system"] == "Be brief." and line["messages"][0][0] == "user"
    assert line["response"] == report["result"]["content"]["text"]


def test_audit_rotation_keeps_the_trail_bounded(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", max_bytes=10_000, backups=2, include_text=False)
    for i in range(400):
        log.write(AuditRecord("s", str(i), decision="approved", reason="x" * 50))
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    assert all((tmp_path / f).stat().st_size <= 10_000 for f in files)
    records = list(log.records())
    assert records[-1]["request_id"] == "399"
    ids = [int(r["request_id"]) for r in records]
    assert ids == sorted(ids) and len(ids) < 400  # oldest dropped, order kept
    assert log.tail(3)[-1]["request_id"] == "399" and len(log.tail(3)) == 3
    assert log.stats()["s"]["requests"] == len(records)


@asynccontextmanager
async def serve_host(config: Path, elicitation: Any = None) -> AsyncIterator[Client]:
    env = os.environ | {"LOCALSAMPLE_CONFIG": str(config)}
    args = ["-m", "localsample", "serve", "--protocol", "legacy", "--server", f"test={DOWNSTREAM}"]
    params = StdioServerParameters(command=sys.executable, args=args, env=env)
    async with Client(params, mode="legacy", elicitation_callback=elicitation) as client:
        yield client


@pytest.mark.slow
async def test_serve_asks_the_host_through_elicitation(model_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[servers.test]\napprove = "ask"\n')
    asked: list[str] = []

    async def answer(context: ClientRequestContext, params: types.ElicitRequestParams) -> types.ElicitResult:
        asked.append(params.message)
        approve = "yes please" in params.message
        return types.ElicitResult(action="accept", content={"approve": approve, "reason": "not this one"})

    async with serve_host(config, answer) as host:
        yes = json.loads((await host.call_tool("push", {"text": "yes please", "max_tokens": 4})).content[0].text)  # type: ignore[union-attr]
        no = json.loads((await host.call_tool("push", {"text": "nope", "max_tokens": 4})).content[0].text)  # type: ignore[union-attr]
    assert "Sampling request from server 'test'" in asked[0] and "user: yes please" in asked[0]
    assert "model: smollm2-135m-instruct" in asked[0]
    assert yes["result"]["model"] == "smollm2-135m-instruct"
    assert no["error"]["code"] == -1
    assert "rejected by the host user (elicitation): not this one" in no["error"]["message"]


@pytest.mark.slow
async def test_serve_without_host_elicitation_denies_by_default(model_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[servers.test]\napprove = "ask"\n')
    async with serve_host(config) as host:
        report = json.loads((await host.call_tool("push", {"max_tokens": 4})).content[0].text)  # type: ignore[union-attr]
    assert report["error"]["code"] == -1
    assert "the host does not support elicitation" in report["error"]["message"]


def spawn_call(tmp_path: Path, policy: str, *arguments: str) -> pexpect.spawn:
    config = tmp_path / "config.toml"
    config.write_text(f"[servers.test]\n{policy}\n")
    env = os.environ | {"LOCALSAMPLE_CONFIG": str(config), "LOCALSAMPLE_LOG_DIR": str(tmp_path / "logs")}
    args = ["-m", "localsample", "call", "--quiet", "--protocol", "legacy", "--server", f"test={DOWNSTREAM}"]
    args += arguments
    return pexpect.spawn(sys.executable, args, env=env, encoding="utf-8", timeout=60, cwd=str(ROOT))


def result_of(child: pexpect.spawn) -> dict[str, Any]:
    child.expect(pexpect.EOF)
    output = child.before
    start = output.index('{"progress"')
    return json.loads(output[start : output.index("\n", start)])  # type: ignore[no-any-return]


@pytest.mark.slow
def test_terminal_approval_approve(model_dir: Path, tmp_path: Path) -> None:
    child = spawn_call(tmp_path, 'approve = "ask"', "push", "--args", '{"max_tokens": 5}')
    child.expect("Sampling request from server 'test'")
    child.expect("model: smollm2-135m-instruct")
    child.expect(r"Approve\? \[y\]es / \[n\]o / \[e\]dit: ")
    child.sendline("y")
    assert result_of(child)["result"]["stopReason"] == "maxTokens"


@pytest.mark.slow
def test_terminal_approval_reject_with_a_reason(model_dir: Path, tmp_path: Path) -> None:
    child = spawn_call(tmp_path, 'approve = "ask"', "push")
    child.expect(r"Approve\? ")
    child.sendline("n")
    child.expect("Reason")
    child.sendline("too expensive")
    error = result_of(child)["error"]
    assert error["code"] == -1 and "rejected by the user at the terminal: too expensive" in error["message"]


@pytest.mark.slow
def test_terminal_edit_then_review_and_edit_the_response(model_dir: Path, tmp_path: Path) -> None:
    child = spawn_call(tmp_path, 'approve = "ask"\nreview_response = true', "push", "--args", '{"max_tokens": 40}')
    child.expect(r"Approve\? ")
    child.sendline("e")
    child.expect("New prompt")
    child.sendline("Count to three.")
    child.expect(r"maxTokens \[40\]")
    child.sendline("3")
    child.expect(r"temperature")
    child.sendline("")
    child.expect("user: Count to three.")
    child.expect("maxTokens 3")
    child.expect(r"Approve\? ")
    child.sendline("y")
    child.expect(r"Send it\? ")
    child.sendline("e")
    child.expect("New response")
    child.sendline("One, two, three.")
    result = result_of(child)["result"]
    assert result["content"]["text"] == "One, two, three."
    line = json.loads((tmp_path / "logs" / "audit.jsonl").read_text().splitlines()[-1])
    assert line["completion_tokens"] == 3 and line["by"] == "user at the terminal"


@pytest.mark.slow
def test_audit_commands_show_recent_entries_and_stats(model_dir: Path, tmp_path: Path) -> None:
    import subprocess

    log_dir = tmp_path / "logs"
    log = AuditLog(log_dir / "audit.jsonl", max_bytes=10**6, backups=1, include_text=False)
    log.write(
        AuditRecord(
            "a",
            "1",
            model="m1",
            decision="approved",
            by="policy",
            prompt_tokens=10,
            completion_tokens=5,
            duration=0.5,
            stop_reason="endTurn",
        )
    )
    log.write(AuditRecord("b", "2", decision="rejected", by="policy", error="denied"))
    env = os.environ | {"LOCALSAMPLE_LOG_DIR": str(log_dir)}

    def run(*args: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "localsample", "audit", *args], capture_output=True, text=True, env=env, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    tail = run("tail", "-n", "5").splitlines()
    assert len(tail) == 2 and "a  m1  approved by policy  10+5 tok  0.50s  endTurn" in tail[0]
    assert "error: denied" in tail[1]
    assert [json.loads(x)["server"] for x in run("tail", "--json").splitlines()] == ["a", "b"]
    stats = json.loads(run("stats", "--json"))
    assert stats["a"]["requests"] == 1 and stats["a"]["completion_tokens"] == 5 and stats["a"]["models"] == {"m1": 1}
    assert stats["b"]["decisions"] == {"rejected": 1}
    assert "a: 1 requests (approved 1)" in run("stats")
