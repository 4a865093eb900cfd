"""`localsample run`: an offline agent on the terminal (a task, or a conversation).

With a TASK the run prints the final answer on stdout (or, with ``--json``, one object
with every step) and exits 0; reaching ``--max-steps`` exits 1. The model's text streams
to the terminal as it is generated and each tool call gets a line on stderr. Without a
TASK it opens a conversation: each line is a message; ``/tools``, ``/model [ID]``,
``/exit``. Ctrl-C cancels what runs (generation, and a tool call, with a cancellation
sent to its server): mid-reply in a conversation it ends that reply, else the run exits
130; the reply cut short is dropped from the conversation. ``--save FILE`` keeps the
conversation after every reply; ``--resume FILE`` goes on from one.
"""

from __future__ import annotations

import logging
import re
import signal
import sys
from collections.abc import Awaitable
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, TextIO, TypeVar

import anyio
import typer

from localsample.agent import Agent, AgentOptions, TurnResult
from localsample.approval import TerminalApprover, in_daemon_thread
from localsample.cli_common import (
    INTERRUPTED,
    JsonOption,
    NoDaemonOption,
    OfflineOption,
    end_line,
    make_client_runtime,
    parse_env,
    print_json,
    run_async,
    stream_text,
)
from localsample.client import ServerSpec
from localsample.conversation import Conversation
from localsample.errors import AgentError, LocalsampleError
from localsample.generation import ToolCall
from localsample.policy import call_line
from localsample.toolbox import AgentTool, Toolbox, ToolOutcome, run_id

T = TypeVar("T")
log = logging.getLogger(__name__)
RESULT_PREVIEW = 100
"""Characters of a tool's result shown on its line."""
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
CHAT_HELP = "/tools: list the tools; /model [ID]: show or switch the model; /exit (or Ctrl-D): leave"


class TerminalView:
    """Shows a run: the model's text where the user reads it, a line per tool call on stderr."""

    def __init__(self, text_out: TextIO | None, calls_out: TextIO | None) -> None:
        self.text_out = text_out
        self.calls_out = calls_out
        self.streamed = False

    async def text(self, text: str, tokens: int) -> None:
        if self.text_out is not None:
            stream_text(self.text_out, text)
            self.streamed = True

    def _line(self, line: str) -> None:
        if self.calls_out is not None:
            if self.text_out is not None:
                end_line(self.text_out)
            self.calls_out.write(line + "\n")
            self.calls_out.flush()

    def calling(self, tool: AgentTool | None, call: ToolCall) -> None:
        where = f"  [{tool.server}]" if tool else ""
        self._line(f"-> {call_line(call)}{where}")

    def called(self, call: ToolCall, outcome: ToolOutcome) -> None:
        text = printable(" ".join(outcome.text.split()))
        short = text if len(text) <= RESULT_PREVIEW else text[: RESULT_PREVIEW - 3] + "..."
        self._line(f"{'x' if outcome.is_error else '<-'} {call.name}: {short} ({outcome.duration:.2f}s)")


def printable(text: str) -> str:
    """``text`` without control characters (a server's text must not drive the terminal)."""
    return CONTROL.sub("?", text)


def transcript(agent: Agent, result: TurnResult) -> dict[str, Any]:
    """The ``--json`` object: the answer, how the run ended, the model and why, every step."""
    return {
        "answer": result.answer,
        "finish": result.finish,
        "model": agent.choice.model.id,
        "reason": agent.choice.reason,
        "steps": [asdict(step) for step in result.steps],
        "tool_calls": sum(len(step.calls) for step in result.steps),
    }


def split_names(values: list[str] | None) -> list[str]:
    """``--tools a,b --tools c`` as ``[a, b, c]``."""
    return [name.strip() for value in values or [] for name in value.split(",") if name.strip()]


def run_command(
    task: Annotated[str | None, typer.Argument(help="The task; without it, a conversation on the terminal.")] = None,
    server: Annotated[
        list[str] | None, typer.Option("--server", "-s", help="[NAME=]COMMAND or http(s)://URL (repeatable).")
    ] = None,
    env: Annotated[list[str] | None, typer.Option("--env", help="KEY=VALUE for stdio servers (repeatable).")] = None,
    cwd: Annotated[Path | None, typer.Option("--cwd", help="Working directory for stdio servers.")] = None,
    protocol: Annotated[str, typer.Option("--protocol", help="auto, legacy or 2026-07-28.")] = "auto",
    model: Annotated[str | None, typer.Option(help="Catalog id or alias (default: chosen for tool use).")] = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    temperature: Annotated[float | None, typer.Option(min=0.0, max=2.0, help="0 = greedy.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens the model writes per step.")] = 512,
    max_steps: Annotated[int, typer.Option(min=1, help="Most model turns for one task.")] = 10,
    tools: Annotated[
        list[str] | None, typer.Option("--tools", help="Only these tools (comma-separated, globs allowed).")
    ] = None,
    exclude_tools: Annotated[
        list[str] | None, typer.Option("--exclude-tools", help="Not these tools (comma-separated, globs allowed).")
    ] = None,
    tool_choice: Annotated[
        str, typer.Option(help="auto; required (the first step of each task must call a tool); none.")
    ] = "auto",
    save: Annotated[Path | None, typer.Option(help="Save the conversation to FILE (JSON) after each reply.")] = None,
    resume: Annotated[Path | None, typer.Option(help="Go on from a conversation saved with --save.")] = None,
    as_json: JsonOption = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Show only the final answer.")] = False,
    no_daemon: NoDaemonOption = False,
    offline: OfflineOption = False,
) -> None:
    """Do TASK with a local model that uses the servers' tools, offline.

    Their sampling requests are answered locally too. Tool calls need approval per server
    (approve_tools / auto_tools in [servers.NAME]).
    """
    if tool_choice not in ("auto", "required", "none"):
        raise AgentError(f"--tool-choice {tool_choice!r} is not auto, required or none", "use one of the three")
    if not server:
        raise AgentError("run needs at least one --server", 'add --server "python my_server.py"')
    if task is None and (as_json or not sys.stdin.isatty()):
        raise AgentError(
            "no TASK given, and a conversation needs a terminal" + (" (and no --json)" if as_json else ""),
            'give the task as an argument: localsample run --server ... "TASK"',
        )
    specs = [ServerSpec.parse(value, env=parse_env(env), cwd=cwd, protocol=protocol) for value in server]
    if save is not None and not save.parent.is_dir():
        raise AgentError(f"--save {save}: the directory {save.parent} does not exist", "create it, or save elsewhere")
    conversation = Conversation.load(resume) if resume else Conversation()
    if system is not None:
        conversation.system = system
    options = AgentOptions(model, max_steps, max_tokens, temperature, tool_choice)  # type: ignore[arg-type]
    runtime = make_client_runtime("run", no_daemon, ",".join(spec.name for spec in specs), offline)
    if runtime.settings.log_level == "info":  # the run's own lines say what happens; keep warnings
        logging.getLogger("localsample").setLevel(logging.WARNING)
    show = not (quiet or as_json)
    text_out = sys.stdout if sys.stdout.isatty() else sys.stderr if sys.stderr.isatty() else None
    view = TerminalView(text_out if show else None, sys.stderr if show else None)
    asker = TerminalApprover()
    session = Session(conversation, save)
    toolbox = Toolbox(
        runtime,
        specs,
        ask=asker,
        echo=(lambda text: stream_text(sys.stderr, text)) if show and sys.stderr.isatty() else None,
        only=split_names(tools),
        exclude=split_names(exclude_tools),
    )

    async def go() -> TurnResult | None:
        try:
            async with toolbox:
                agent = Agent(runtime, toolbox, options, conversation=conversation, view=view, run_id=run_id())
                session.agent = agent
                if task is None:
                    await session.chat()
                    return None
                return await session.turn(task, ends_run=True)
        finally:
            session.save_now()
            await runtime.aclose()

    result = run_async(go)
    if session.interrupted:
        typer.echo("\ninterrupted", err=True)
        raise typer.Exit(INTERRUPTED)
    if result is not None:
        assert session.agent is not None
        report(session.agent, result, as_json=as_json, streamed_to_stdout=view.streamed and text_out is sys.stdout)


def report(agent: Agent, result: TurnResult, *, as_json: bool, streamed_to_stdout: bool) -> None:
    """The end of a task: the answer on stdout (or the --json transcript); the step limit
    reached is an error (exit 1) after the transcript."""
    if as_json:
        print_json(transcript(agent, result))
    elif result.answer is not None:
        if streamed_to_stdout:
            end_line(sys.stdout)
        else:
            typer.echo(result.answer)
    if result.finish == "max_steps":
        raise AgentError(
            f"stopped after {agent.options.max_steps} steps without a final answer",
            "raise --max-steps, or give a narrower task (with --save FILE, --resume FILE goes on from here)",
        )


class Session:
    """One `run` on the terminal: Ctrl-C handling, saving, and the conversation loop."""

    def __init__(self, conversation: Conversation, save: Path | None) -> None:
        self.conversation = conversation
        self.save = save
        self.agent: Agent | None = None
        self.interrupted = False

    def save_now(self) -> None:
        """Save the conversation (with --save); a failure is logged, never fatal."""
        if self.save is None:
            return
        try:
            self.conversation.save(self.save)
        except OSError as exc:
            log.error("the conversation was not saved to %s: %s", self.save, exc)

    async def turn(self, text: str, *, ends_run: bool) -> TurnResult | None:
        """One task or message; on Ctrl-C (None) or an error the conversation is as it was
        before it."""
        assert self.agent is not None
        before = list(self.conversation.messages)
        try:
            result = await self.interruptible(self.agent.turn(text), ends_run=ends_run)
        except BaseException:
            self.conversation.messages[:] = before
            raise
        if result is None:
            self.conversation.messages[:] = before
        return result

    async def interruptible(self, work: Awaitable[T], *, ends_run: bool = True) -> T | None:
        """Await ``work``; Ctrl-C cancels it (and, if ``ends_run``, the run: exit 130).
        Returns None when interrupted."""
        result: T | None = None
        with anyio.open_signal_receiver(signal.SIGINT) as signals:
            async with anyio.create_task_group() as group:

                async def watch() -> None:
                    async for _ in signals:
                        self.interrupted = self.interrupted or ends_run
                        group.cancel_scope.cancel()
                        return

                async def main() -> None:
                    nonlocal result
                    result = await work
                    group.cancel_scope.cancel()

                group.start_soon(watch)
                group.start_soon(main)
        return result

    async def chat(self) -> None:
        """Read messages at the terminal until /exit, Ctrl-D or Ctrl-C at the prompt."""
        import readline  # noqa: F401  (line editing and history for input())

        agent = self.agent
        assert agent is not None
        sys.stderr.write(f"localsample run: {agent.choice.model.id}, {len(agent.toolbox.tools)} tools. {CHAT_HELP}\n")
        while not self.interrupted:
            line = await self.interruptible(in_daemon_thread(lambda: read_line("> ")))
            text = (line or "").strip()
            if line is None or text in ("/exit", "/quit"):
                return
            if text.startswith("/"):
                self.command(agent, text)
            elif text:
                await self.reply(agent, text)

    def command(self, agent: Agent, text: str) -> None:
        """``/tools``, ``/model [ID]``; anything else gets the help line."""
        name, _, rest = text.partition(" ")
        if name == "/tools":
            for tool in agent.toolbox.tools.values():
                first = tool.description.strip().splitlines()[0] if tool.description.strip() else ""
                sys.stderr.write(f"  {tool.name}  [{tool.server}]  {printable(first)}\n")
        elif name == "/model":
            try:
                if rest.strip():
                    agent.use_model(rest.strip())
                sys.stderr.write(f"  model: {agent.choice.model.id} ({agent.choice.reason})\n")
            except LocalsampleError as exc:
                sys.stderr.write(f"  error: {exc}\n")
        else:
            sys.stderr.write(f"  unknown command {name}; {CHAT_HELP}\n")

    async def reply(self, agent: Agent, text: str) -> None:
        """One message and the model's reply; a failure is shown and the conversation goes on."""
        try:
            result = await self.turn(text, ends_run=False)
        except LocalsampleError as exc:
            end_line(sys.stdout)
            sys.stderr.write(f"  error: {exc}\n")
            return
        end_line(sys.stdout)
        if result is None:
            sys.stderr.write("  (reply cancelled; the conversation is as it was before your message)\n")
        elif result.finish == "max_steps":
            sys.stderr.write("  (stopped at --max-steps without an answer; send a message to go on)\n")
        self.save_now()


def read_line(prompt: str) -> str | None:
    """One line from the terminal, None at end of input (Ctrl-D)."""
    try:
        return input(prompt)
    except EOFError:
        return None
