"""`run`'s logic without a model or a server: approval rules, tool names, the context
window, saved conversations and the command's own errors (real runs: test_run.py)."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest
from mcp import types
from typer.testing import CliRunner

from localsample.approval import TerminalApprover
from localsample.cli import app
from localsample.conversation import Conversation, truncated_result
from localsample.downstream import exposed_names
from localsample.errors import AgentError
from localsample.generation import ChatMessage, ToolCall
from localsample.policy import Decision
from localsample.runtime import Runtime
from localsample.settings import ServerSettings, load_settings
from localsample.toolbox import AgentTool, Toolbox, model_text, tool_approval

runner = CliRunner()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def runtime_with(**servers: ServerSettings) -> Runtime:
    return Runtime(load_settings(servers=servers))


def test_approval_follows_auto_tools_then_approve_tools_then_the_terminal() -> None:
    runtime = runtime_with(
        notes=ServerSettings(approve_tools="deny", auto_tools=["read_*", "list_notes"]),
        open=ServerSettings(approve_tools="auto"),
        careful=ServerSettings(approve_tools="ask"),
    )
    try:
        assert tool_approval(runtime, "notes", "read_note", can_ask=False) == "auto"
        assert tool_approval(runtime, "notes", "list_notes", can_ask=True) == "auto"
        assert tool_approval(runtime, "notes", "write_note", can_ask=True) == "deny"
        assert tool_approval(runtime, "open", "write_note", can_ask=False) == "auto"
        assert tool_approval(runtime, "careful", "x", can_ask=True) == "ask"
        assert tool_approval(runtime, "careful", "x", can_ask=False) == "deny"  # nobody to ask
        assert tool_approval(runtime, "unset", "x", can_ask=True) == "ask"  # the default on a terminal
        assert tool_approval(runtime, "unset", "x", can_ask=False) == "deny"  # and without one
    finally:
        runtime.close()


def test_names_two_servers_share_are_prefixed_and_the_others_kept() -> None:
    listed = [("a", "read"), ("a", "write"), ("b", "read"), ("b", "search")]
    assert exposed_names(listed) == ["a__read", "write", "b__read", "search"]


def test_a_long_tool_result_is_cut_with_a_note() -> None:
    assert truncated_result("short", 4096, 0.25) == "short"
    cut = truncated_result("x" * 50_000, 4096, 0.25)
    assert cut.startswith("x" * 3072) and "[cut: the result had 50000 characters; only the first 3072" in cut
    assert len(cut) < 3072 + 200


def exchange(n: int, size: int = 300) -> list[ChatMessage]:
    call = ToolCall(f"c{n}", "search", {"q": str(n)})
    return [ChatMessage("assistant", "", (call,)), ChatMessage("tool", "r" * size, tool_call_id=f"c{n}")]


def test_fit_drops_the_oldest_exchanges_whole_and_keeps_the_task_and_the_latest() -> None:
    old = [ChatMessage("user", "old question " * 50), ChatMessage("assistant", "old answer " * 50)]
    task = ChatMessage("user", "the task")
    messages = [*old, task, *exchange(1), *exchange(2), *exchange(3)]
    conversation = Conversation(list(messages))
    assert conversation.fit(10_000) == 0 and conversation.messages == messages
    dropped = conversation.fit(conversation.estimate() - 150)
    assert dropped == 2 and conversation.messages == messages[2:]  # the old turns go first
    dropped = conversation.fit(0)  # cannot fit: all but the task and the latest exchange go
    assert dropped == 4 and conversation.messages == [task, *exchange(3)]
    for message in conversation.messages[1:]:
        assert message.tool_calls or message.tool_call_id == "c3"  # a call keeps its result


def test_fit_can_be_told_to_drop_more_when_the_engine_says_it_does_not_fit() -> None:
    conversation = Conversation([ChatMessage("user", "task"), *exchange(1), *exchange(2)])
    assert conversation.fit(10_000, at_least=1) == 2
    assert [m.tool_call_id for m in conversation.messages] == [None, None, "c2"]


def test_a_saved_conversation_round_trips_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    conversation = Conversation([ChatMessage("user", "hi"), *exchange(1)], system="be brief", model="m")
    conversation.save(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert Conversation.load(path) == conversation


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("not json", "not a saved conversation"),
        ('{"version": 2, "messages": []}', "expected an object with version 1"),
        ('{"version": 1, "messages": [{"role": "robot", "content": "x"}]}', "role 'robot'"),
        ('{"version": 1, "messages": [{"role": "tool", "content": "x", "tool_call_id": "c9"}]}', "answers no earlier"),
        ('{"version": 1}', "not a saved conversation ('messages')"),
    ],
)
def test_a_bad_saved_conversation_is_a_clear_error(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "c.json"
    path.write_text(content)
    with pytest.raises(AgentError, match="--resume") as caught:
        Conversation.load(path)
    assert problem in str(caught.value) and "localsample run --save FILE" in str(caught.value)


def test_run_refuses_what_it_cannot_do_with_a_fix(tmp_path: Path) -> None:
    cases = [
        (["run", "task"], "run needs at least one --server"),
        (["run", "-s", "python x.py", "--tool-choice", "maybe", "task"], "--tool-choice 'maybe' is not"),
        (["run", "-s", "python x.py"], "no TASK given, and a conversation needs a terminal"),
        (["run", "-s", "python x.py", "--resume", str(tmp_path / "none.json"), "t"], "no such file"),
    ]
    for args, problem in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 1, result.output
        assert problem in result.stderr and "fix:" in result.stderr


def test_a_saved_message_has_only_the_fields_it_uses(tmp_path: Path) -> None:
    saved = tmp_path / "c.json"
    Conversation([ChatMessage("user", "hi")]).save(saved)
    assert json.loads(saved.read_text())["messages"] == [{"role": "user", "content": "hi"}]


def test_a_result_the_model_reads_never_carries_base64() -> None:
    result = types.CallToolResult(
        content=[
            types.TextContent(type="text", text="the chart:"),
            types.ImageContent(type="image", data="A" * 4000, mime_type="image/png"),
            types.EmbeddedResource(
                type="resource",
                resource=types.TextResourceContents(uri="file:///a.txt", text="hello", mime_type="text/plain"),
            ),
            types.ResourceLink(type="resource_link", uri="file:///b.bin", name="b.bin"),
        ]
    )
    text = model_text(result)
    assert text.splitlines() == [
        "the chart:",
        "[image: image/png, about 3000 bytes, not shown]",
        "[resource file:///a.txt]",
        "hello",
        "[resource link file:///b.bin: b.bin]",
    ]
    structured = types.CallToolResult(content=[], structured_content={"n": 1})
    assert model_text(structured) == '{"n": 1}'


class SilentAsker(TerminalApprover):
    """A person who never answers (or whose terminal closes)."""

    def __init__(self, closes: bool) -> None:
        super().__init__()
        self.closes = closes

    def available(self) -> bool:
        return True

    async def approve_tool(self, server: str, call: ToolCall) -> Decision:
        if self.closes:
            raise EOFError("the terminal closed")
        await anyio.sleep(3600)
        raise AssertionError("not reached")


@pytest.mark.anyio
@pytest.mark.parametrize("closes", [False, True])
async def test_an_unanswered_or_closed_approval_is_a_refusal(closes: bool) -> None:
    runtime = runtime_with(notes=ServerSettings(approve_tools="ask", ask_timeout=0.2))
    toolbox = Toolbox(runtime, [], ask=SilentAsker(closes))
    toolbox.tools["read"] = AgentTool("read", "notes", "read", "", {"type": "object"})
    try:
        outcome = await toolbox.call(ToolCall("c1", "read", {}), "r-1")
    finally:
        runtime.close()
    assert outcome.is_error and outcome.refused
    expected = "the terminal closed before an answer" if closes else "no answer within 0.2 s (ask_timeout)"
    assert outcome.text == f"Error: the user refused this call: {expected}"
