"""`localsample run`: the real default model, greedy, driving real MCP servers over stdio
(the notes example, and tests/servers/agent_server.py for what the example cannot do on
demand). SmolLM2-135M does not call tools by itself, so tasks use ``--tool-choice
required`` (the first step must call a tool; the agent then resets to auto) and
``--tools`` to pick the tool under test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jsonschema
import pexpect
import pytest

from tests.test_call import free_port

ROOT = Path(__file__).resolve().parent.parent
NOTES_SERVER = ROOT / "examples" / "notes_server.py"
NOTES = f"notes={sys.executable} {NOTES_SERVER} {ROOT / 'examples' / 'notes'}"
AGENT = f"agent={sys.executable} {ROOT / 'tests' / 'servers' / 'agent_server.py'}"
NAME_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
AUTO = '[servers.notes]\napprove_tools = "auto"\n[servers.agent]\napprove_tools = "auto"\n'

QUICK = ("--temperature", "0", "--max-tokens", "48")
"""Greedy, and short steps: enough for a call or a sentence."""

pytestmark = pytest.mark.slow


def configure(text: str) -> None:
    Path(os.environ["LOCALSAMPLE_CONFIG"]).write_text(text)


def run(*args: str, config: str = AUTO, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    configure(config)
    command = [sys.executable, "-m", "localsample", "run", *QUICK, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def transcript(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def audit_lines() -> list[dict[str, Any]]:
    path = Path(os.environ["LOCALSAMPLE_LOG_DIR"]) / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def spawn(*args: str, config: str = "", env: dict[str, str] | None = None) -> pexpect.spawn:
    configure(config)
    arguments = ["-m", "localsample", "run", *QUICK, *args]
    return pexpect.spawn(
        sys.executable, arguments, env=os.environ | (env or {}), encoding="utf-8", timeout=120, cwd=str(ROOT)
    )


def test_a_task_calls_its_tool_reads_the_result_and_answers_then_resumes(model_dir: Path, tmp_path: Path) -> None:
    saved = tmp_path / "conversation.json"
    task = "What should I plant, according to garden.md?"
    proc = run("-s", NOTES, "--tool-choice", "required", "--tools", "read_note", "--json", "--save", str(saved), task)
    assert proc.returncode == 0, proc.stderr
    data = transcript(proc)
    assert data["finish"] == "answered" and data["model"] == "smollm2-135m-instruct" and data["reason"]
    first, last = data["steps"][0], data["steps"][-1]
    assert first["stop_reason"] == "toolUse" and first["calls"]
    for call in first["calls"]:
        assert call["name"] == "read_note" and call["server"] == "notes"
        jsonschema.validate(call["arguments"], NAME_SCHEMA)  # the call is schema-valid
        if call["arguments"]["name"] in ("garden", "garden.md"):
            assert "tomatoes" in call["result"] and not call["is_error"]
        else:  # the server's own answer for a note that does not exist
            assert "there is no note" in call["result"] and call["is_error"]
        assert call["duration"] >= 0
    assert not last["calls"] and last["stop_reason"] == "endTurn"
    assert data["answer"] == last["text"] and data["answer"].strip()
    assert last["prompt_tokens"] > first["prompt_tokens"] + first["completion_tokens"]  # results went back in
    for step in data["steps"]:
        assert step["completion_tokens"] > 0 and 0 < step["time_to_first_token"] <= step["duration"]

    conversation = json.loads(saved.read_text())
    assert saved.stat().st_mode & 0o777 == 0o600
    roles = [m["role"] for m in conversation["messages"]]
    assert roles == ["user", "assistant"] + ["tool"] * len(first["calls"]) + ["assistant"]
    assert conversation["messages"][2]["content"] == first["calls"][0]["result"]
    assert conversation["messages"][2]["tool_call_id"] == conversation["messages"][1]["tool_calls"][0]["id"]

    # --resume goes on from the saved conversation, with the same model.
    more = run("-s", NOTES, "--resume", str(saved), "--save", str(saved), "--json", "--tool-choice", "none", "Thanks!")
    assert more.returncode == 0, more.stderr
    assert transcript(more)["model"] == "smollm2-135m-instruct"
    after = json.loads(saved.read_text())["messages"]
    assert after[: len(conversation["messages"])] == conversation["messages"]
    assert [m["role"] for m in after[len(roles) :]] == ["user", "assistant"]
    assert after[len(roles)]["content"] == "Thanks!"

    # Every step is audited with origin run: the model turns (server "run") and each tool call.
    lines = [line for line in audit_lines() if line.get("origin") == "run"]
    turns = [line for line in lines if line["server"] == "run"]
    calls = [line for line in lines if line.get("tool")]
    assert len(turns) == len(data["steps"]) + 1 and turns[0]["tools_called"] == ["read_note"] * len(first["calls"])
    assert [c["tool"] for c in calls] == ["read_note"] * len(first["calls"]) and "arguments" not in calls[0]


def test_stdout_holds_only_the_answer_and_tool_lines_go_to_stderr(model_dir: Path) -> None:
    proc = run("-s", NOTES, "--tool-choice", "required", "--tools", "list_notes", "Which notes do I have?")
    assert proc.returncode == 0, proc.stderr
    assert "-> list_notes({})  [notes]" in proc.stderr
    assert "<- list_notes: garden.md (" in proc.stderr
    assert proc.stdout.strip() and "-> list_notes" not in proc.stdout and "<- list_notes" not in proc.stdout


def test_the_step_limit_ends_the_run_with_a_clear_error(model_dir: Path) -> None:
    proc = run("-s", NOTES, "--tool-choice", "required", "--tools", "list_notes", "--max-steps", "1", "--json", "Hi")
    assert proc.returncode == 1
    assert "stopped after 1 steps without a final answer" in proc.stderr and "--max-steps" in proc.stderr
    data = transcript(proc)
    assert data["finish"] == "max_steps" and data["answer"] is None and len(data["steps"]) == 1


def test_a_call_cut_by_max_tokens_is_tried_once_more_with_twice_the_room(model_dir: Path) -> None:
    args = ("-s", NOTES, "--tool-choice", "required", "--tools", "list_notes", "--json")
    proc = run(*args, "--max-tokens", "20", "Which notes do I have?")  # a call needs more than 20
    assert proc.returncode == 0, proc.stderr
    assert "ran out in the middle of the model's tool call" in proc.stderr and "once more with 40 tokens" in proc.stderr
    first = transcript(proc)["steps"][0]
    assert [call["name"] for call in first["calls"]][:1] == ["list_notes"] and first["completion_tokens"] <= 40
    # still cut the second time: the error names the fix
    proc = run(*args, "--max-tokens", "8", "Which notes do I have?")
    assert proc.returncode == 1 and "maxTokens (16) ran out" in proc.stderr and "larger maxTokens" in proc.stderr


def test_a_tool_error_goes_back_to_the_model(model_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "no-notes"
    empty.mkdir()
    server = f"notes={sys.executable} {NOTES_SERVER} {empty}"
    proc = run("-s", server, "--tool-choice", "required", "--tools", "read_note", "--json", "Read my diary note.")
    assert proc.returncode == 0, proc.stderr
    data = transcript(proc)
    call = data["steps"][0]["calls"][0]
    assert call["is_error"] and "there is no note" in call["result"] and call["result"].startswith("Error: ")
    assert len(data["steps"]) == 2 and data["finish"] == "answered"  # the model read the error and answered


def test_settings_deny_a_tool_and_auto_tools_globs_let_it_run(model_dir: Path) -> None:
    args = ("-s", NOTES, "--tool-choice", "required", "--tools", "list_notes", "--json", "List my notes.")
    denied = transcript(run(*args, config='[servers.notes]\napprove_tools = "deny"\n'))["steps"][0]["calls"][0]
    assert denied["is_error"] and "do not let tools of server 'notes' run" in denied["result"]
    # Without a terminal, and no setting, calls are refused too.
    unset = transcript(run(*args, config=""))["steps"][0]["calls"][0]
    assert unset["is_error"] and "approve_tools" in unset["result"]
    allowed = run(*args, config='[servers.notes]\napprove_tools = "deny"\nauto_tools = ["list_*"]\n')
    call = transcript(allowed)["steps"][0]["calls"][0]
    assert not call["is_error"] and "garden.md" in call["result"]
    refused = [line for line in audit_lines() if line.get("tool") and line["decision"] == "rejected"]
    assert len(refused) >= 2 and refused[0]["by"] == "policy"


def test_approval_at_the_terminal_runs_or_refuses_with_a_reason(model_dir: Path, tmp_path: Path) -> None:
    saved = tmp_path / "c.json"
    args = ("-s", NOTES, "--tool-choice", "required", "--tools", "list_notes", "--save", str(saved), "Notes?")
    child = spawn(*args)
    child.expect("The model wants to run a tool of server 'notes':")
    child.expect(r"list_notes\(\{\}\)")
    child.expect(r"Run it\? \[y\]es / \[n\]o / \[a\]lways")
    child.sendline("a")  # the model may call it more than once: "always" answers for the rest
    child.expect("<- list_notes: garden.md")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert "garden.md" in json.loads(saved.read_text())["messages"][2]["content"]

    child = spawn(*args)
    while child.expect([r"Run it\? ", pexpect.EOF]) == 0:  # one question per call the model made
        child.sendline("n")
        child.expect("Reason, for the model")
        child.sendline("not now")
    child.close()
    assert child.exitstatus == 0
    result = json.loads(saved.read_text())["messages"][2]
    assert result["role"] == "tool" and result["content"] == "Error: the user refused this call: not now"


def test_ctrl_c_cancels_the_running_tool_call_and_exits_130(model_dir: Path, tmp_path: Path) -> None:
    mark = tmp_path / "mark"
    args = ("-s", AGENT, "--tool-choice", "required", "--tools", "wait_forever", "Wait for the delivery.")
    child = spawn(*args, config=AUTO, env={"AGENT_MARK": str(mark)})
    child.expect(r"-> wait_forever\(\{\}\)")
    deadline = time.monotonic() + 30
    while not (mark.exists() and mark.read_text() == "started") and time.monotonic() < deadline:
        time.sleep(0.1)
    child.sendintr()
    child.expect("interrupted")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130
    assert mark.read_text() == "cancelled"  # the server got notifications/cancelled


def test_colliding_tool_names_are_prefixed_with_the_server(model_dir: Path) -> None:
    both = ("-s", NOTES, "-s", AGENT, "--tool-choice", "required", "--json", "List the notes.")
    data = transcript(run(*both, "--tools", "agent__list_notes"))
    call = data["steps"][0]["calls"][0]
    assert call["name"] == "agent__list_notes" and call["server"] == "agent"
    assert call["result"] == "agent-server-note.md (1 bytes)"
    unknown = run(*both, "--tools", "list_notes")
    assert unknown.returncode == 1 and "--tools: no tool matches list_notes" in unknown.stderr
    assert "notes__list_notes" in unknown.stderr and "agent__list_notes" in unknown.stderr


def test_a_server_that_samples_inside_its_tool_is_answered_locally(model_dir: Path) -> None:
    proc = run("-s", AGENT, "--tool-choice", "required", "--tools", "forecast", "--json", "Weather tomorrow?")
    assert proc.returncode == 0, proc.stderr
    call = transcript(proc)["steps"][0]["calls"][0]
    assert not call["is_error"] and call["result"].startswith("forecast: ") and len(call["result"]) > 15
    sampled = [line for line in audit_lines() if line["server"] == "agent" and not line.get("tool")]
    assert sampled and sampled[0]["origin"] == "run" and sampled[0]["decision"] == "approved"


def test_a_huge_tool_result_is_cut_to_fit_the_context(model_dir: Path) -> None:
    proc = run("-s", AGENT, "--tool-choice", "required", "--tools", "big_report", "--json", "Summarize the report.")
    assert proc.returncode == 0, proc.stderr
    data = transcript(proc)
    result = data["steps"][0]["calls"][0]["result"]
    assert "[cut: the result had" in result and len(result) < 8192 * 0.25 * 3 + 300
    assert data["finish"] == "answered" and data["steps"][1]["prompt_tokens"] < 8192


def test_old_turns_are_dropped_when_a_conversation_outgrows_the_context(model_dir: Path, tmp_path: Path) -> None:
    saved = tmp_path / "long.json"
    filler = "We talked about the weather and the garden at length. " * 18
    messages = []
    for n in range(30):
        messages += [{"role": "user", "content": f"Turn {n}. {filler}"}, {"role": "assistant", "content": filler}]
    saved.write_text(json.dumps({"version": 1, "system": None, "model": None, "messages": messages}))
    proc = run("-s", NOTES, "--resume", str(saved), "--tool-choice", "none", "--max-tokens", "16", "--json", "Bye.")
    assert proc.returncode == 0, proc.stderr
    assert "context: dropped the" in proc.stderr
    step = transcript(proc)["steps"][0]
    assert step["prompt_tokens"] + 16 <= 8192


def test_a_conversation_on_the_terminal_with_commands(model_dir: Path, tmp_path: Path) -> None:
    saved = tmp_path / "chat.json"
    child = spawn("-s", NOTES, "--save", str(saved), config=AUTO)
    child.expect(r"localsample run: smollm2-135m-instruct, 5 tools\. /tools")
    child.expect("> ")
    child.sendline("/tools")
    child.expect(r"read_note  \[notes\]  The whole text of one note")
    child.sendline("/model")
    child.expect(r"model: smollm2-135m-instruct \(")
    child.sendline("/nonsense")
    child.expect("unknown command /nonsense")
    child.sendline("Hello, who are you?")
    child.expect("> ", timeout=180)  # the reply streamed, the prompt is back
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] and messages[0]["content"] == "Hello, who are you?"
    assert messages[1]["content"].strip()


def test_an_http_server_that_dies_in_a_call_fails_that_call_only(model_dir: Path) -> None:
    port = free_port()
    script = ROOT / "tests" / "servers" / "agent_server.py"
    server = subprocess.Popen([sys.executable, str(script), "--http", str(port)], stderr=subprocess.DEVNULL)
    try:
        url = f"agent=http://127.0.0.1:{port}/mcp"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until it listens
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        proc = run("-s", url, "--tool-choice", "required", "--tools", "crash", "--json", "Restart the service.")
    finally:
        server.kill()
        server.wait()
    assert proc.returncode == 0, proc.stderr
    data = transcript(proc)
    call = data["steps"][0]["calls"][0]
    assert call["is_error"] and "server 'agent' closed the connection" in call["result"]
    assert data["finish"] == "answered" and len(data["steps"]) == 2
