"""The tools of `run`: connections to its servers, their tools under the names the model
sees, and calls to them with approval, a time limit and failures turned into results.

Every ``--server`` is connected (one at a time, each within ``connect_timeout``) with
localsample's sampling callback, so a server that samples inside its tool is answered by
the local model as in `call`. A tool name two servers share is shown to the model as
``SERVER__NAME`` for each, as `serve` shows it to a host.

A call runs only when its server's settings allow it: ``auto_tools`` globs run at once;
else ``approve_tools`` (``auto``, ``ask`` or ``deny``; unset: ask on a terminal, deny
without one). Whatever happens to a call (refused, an error from the server, a timeout,
a server that went away) becomes a result the model reads, marked as an error: a tool
never ends the run. Each call gets one audit line (origin ``run``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from types import TracebackType
from typing import Any, Literal, Protocol

import anyio
from anyio.abc import TaskGroup, TaskStatus
from mcp import types
from mcp.shared.exceptions import MCPError

from localsample.audit import AuditRecord
from localsample.client import ServerClient, ServerSpec, first_cause, make_client, mcp_error_kind
from localsample.downstream import all_pages, exposed_names, headline
from localsample.errors import AgentError, ServerError, ServerSpecError
from localsample.generation import ToolCall, ToolSpec
from localsample.policy import Asker, Decision
from localsample.runtime import Runtime
from localsample.sampling import Echo, SamplingHandler

log = logging.getLogger(__name__)

VIA = "run"
"""The audit trail's ``origin`` for everything a run does."""

ToolApproval = Literal["auto", "ask", "deny"]


class ToolAsker(Asker, Protocol):
    """Asks a person about sampling requests (``Asker``) and about tool calls."""

    async def approve_tool(self, server: str, call: ToolCall) -> Decision: ...


@dataclass(frozen=True)
class AgentTool:
    """A tool as the model sees it (``name``) and where it runs (``server``, ``original``)."""

    name: str
    server: str
    original: str
    description: str
    input_schema: Mapping[str, Any]

    def spec(self) -> ToolSpec:
        return ToolSpec(self.name, self.description, self.input_schema)


@dataclass(frozen=True)
class ToolOutcome:
    """What a call gave the model: the result text (for an error, what went wrong)."""

    text: str
    is_error: bool
    duration: float
    by: str = "policy"
    """Who let it run or refused it: the policy, or the person at the terminal."""
    refused: bool = False


def tool_approval(runtime: Runtime, server: str, tool: str, *, can_ask: bool) -> ToolApproval:
    """How a call of ``tool`` (its server's own name for it) on ``server`` is approved."""
    settings = runtime.settings.server(server)
    if matches(tool, settings.auto_tools):
        return "auto"
    mode = settings.approve_tools or ("ask" if can_ask else "deny")
    return "deny" if mode == "ask" and not can_ask else mode


def matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether ``name`` is one of ``patterns`` (globs: ``read_*``)."""
    return any(fnmatchcase(name, pattern) for pattern in patterns)


class Toolbox:
    """The servers of one run, connected while the toolbox is entered.

    ``only`` / ``exclude`` (names or globs, as the model sees them) limit the tools the
    model is offered; ``echo`` shows text generated for the servers' own sampling.
    """

    def __init__(
        self,
        runtime: Runtime,
        specs: Sequence[ServerSpec],
        *,
        ask: ToolAsker | None = None,
        echo: Echo | None = None,
        only: Sequence[str] = (),
        exclude: Sequence[str] = (),
    ) -> None:
        names = [s.name for s in specs]
        if duplicates := sorted({n for n in names if names.count(n) > 1}):
            raise ServerSpecError(
                f"two --server values share the name {', '.join(duplicates)}", "name each one: --server NAME=COMMAND"
            )
        self.runtime = runtime
        self.specs = list(specs)
        self.ask = ask
        self.echo = echo
        self.only = list(only)
        self.exclude = list(exclude)
        self.clients: dict[str, ServerClient] = {}
        self.gone: dict[str, str] = {}
        """Servers that went away during the run, and why."""
        self.tools: dict[str, AgentTool] = {}
        self.always: set[str] = set()
        """Tools the person said to run without asking again, this session."""
        self.calls = 0
        self._group: TaskGroup | None = None
        self._stop = anyio.Event()

    async def __aenter__(self) -> Toolbox:
        """Connect every server (each held by a task of its own, so that one which goes away
        later only fails its own calls) and list their tools."""
        self._group = anyio.create_task_group()
        await self._group.__aenter__()
        try:
            for spec in self.specs:
                await self._group.start(self._hold, spec)
            with anyio.fail_after(self.runtime.settings.connect_timeout):
                await self._list()
        except BaseException as exc:
            self._stop.set()
            await self._group.__aexit__(type(exc), exc, exc.__traceback__)
            if isinstance(exc, TimeoutError):
                raise ServerError(
                    f"a server did not list its tools within {self.runtime.settings.connect_timeout:g} s",
                    "run the server by itself to see why; a slow one needs a larger connect_timeout",
                ) from None
            if isinstance(exc, MCPError):
                raise ServerError(f"listing the servers' tools failed: {exc}", "run the server by itself") from exc
            raise
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        assert self._group is not None
        await self._group.__aexit__(kind, exc, tb)

    async def _hold(self, spec: ServerSpec, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Connect to ``spec`` and keep the connection until the toolbox exits. Failing to
        connect raises (through ``start``); failing later marks the server gone."""
        handler = SamplingHandler(self.runtime, server=spec.name, echo=self.echo, ask=self.ask, via=VIA)
        client = make_client(spec, handler, connect_timeout=self.runtime.settings.connect_timeout)
        started = False
        try:
            async with client:
                self.clients[spec.name] = client
                task_status.started()
                started = True
                await self._stop.wait()
        except Exception as exc:
            if not started:
                raise client.failure(exc) from exc
            if spec.name not in self.gone:  # (a failed call has said so already)
                self.gone[spec.name] = "it closed the connection"
                cause = headline(str(first_cause(exc)))
                log.warning("%s: the connection ended (%s); its tools now fail", spec.name, cause)

    async def _list(self) -> None:
        listed: list[tuple[str, types.Tool]] = []
        for name, client in self.clients.items():
            if client.server_capabilities is None or client.server_capabilities.tools is None:
                continue
            found = await all_pages(lambda cursor, c=client: c.list_tools(cursor=cursor), "tools")  # type: ignore[misc]
            listed += [(name, tool) for tool in found]
        shown = exposed_names([(server, tool.name) for server, tool in listed])
        every = {
            exposed: AgentTool(exposed, server, tool.name, tool.description or "", dict(tool.input_schema))
            for exposed, (server, tool) in zip(shown, listed, strict=True)
        }
        for option, patterns in (("--tools", self.only), ("--exclude-tools", self.exclude)):
            unknown = [p for p in patterns if not any(matches(n, [p]) for n in every)]
            if unknown:
                raise AgentError(
                    f"{option}: no tool matches {', '.join(unknown)}",
                    f"use the names the servers offer: {', '.join(every) or 'none'}",
                )
        self.tools = {
            name: tool
            for name, tool in every.items()
            if (not self.only or matches(name, self.only)) and not matches(name, self.exclude)
        }

    def specs_offered(self) -> list[ToolSpec]:
        return [tool.spec() for tool in self.tools.values()]

    async def call(self, call: ToolCall, request_id: str) -> ToolOutcome:
        """Run one call the model made (after approval); never raises for the tool's sake."""
        tool = self.tools.get(call.name)
        if tool is None:
            return ToolOutcome(f"Error: there is no tool '{call.name}'", True, 0.0)
        record = AuditRecord(tool.server, request_id, origin=VIA, tool=tool.original)
        if self.runtime.audit is not None and self.runtime.audit.include_text:
            record.arguments = json.dumps(dict(call.arguments), ensure_ascii=False)
        outcome: ToolOutcome | None = None
        try:
            outcome = await self._approved_call(tool, call)
            return outcome
        except anyio.get_cancelled_exc_class():
            record.decision = "cancelled"
            raise
        finally:
            if outcome is not None:
                record.decision = "rejected" if outcome.refused else "approved"
                record.by = outcome.by
                record.is_error, record.duration = outcome.is_error, round(outcome.duration, 4)
                if record.arguments is not None:
                    record.result = outcome.text
            self.runtime.record(record)

    async def _approved_call(self, tool: AgentTool, call: ToolCall) -> ToolOutcome:
        can_ask = self.ask is not None and self.ask.available()
        mode = (
            "auto"
            if tool.name in self.always
            else tool_approval(self.runtime, tool.server, tool.original, can_ask=can_ask)
        )
        by = "policy"
        if mode == "deny":
            problem = f"Error: the user's settings do not let tools of server '{tool.server}' run (approve_tools)"
            return ToolOutcome(problem, True, 0.0, "policy", refused=True)
        if mode == "ask":
            assert self.ask is not None
            decision = await self._ask(tool, call, self.ask)
            if not decision.approved:
                refusal = f"Error: the user refused this call: {decision.reason}"
                return ToolOutcome(refusal, True, 0.0, decision.by, refused=True)
            if decision.reason == "always":
                self.always.add(tool.name)
            by = decision.by
        return await self._run(tool, call, by)

    async def _ask(self, tool: AgentTool, call: ToolCall, ask: ToolAsker) -> Decision:
        """The person's answer; no answer within ``ask_timeout``, or a closed terminal, is a no."""
        timeout = self.runtime.settings.server(tool.server).ask_timeout
        try:
            with anyio.move_on_after(timeout):
                return await ask.approve_tool(tool.server, call)
        except EOFError:
            return Decision(False, "policy", "the terminal closed before an answer")
        return Decision(False, "timeout", f"no answer within {timeout:g} s (ask_timeout)")

    async def _run(self, tool: AgentTool, call: ToolCall, by: str) -> ToolOutcome:
        started = time.perf_counter()

        def failed(text: str) -> ToolOutcome:
            return ToolOutcome(f"Error: {text}", True, time.perf_counter() - started, by)

        if tool.server in self.gone:
            return failed(f"server '{tool.server}' is not available ({self.gone[tool.server]})")
        timeout = self.runtime.settings.server(tool.server).tool_timeout
        self.calls += 1
        try:
            with anyio.fail_after(timeout):
                result = await self.clients[tool.server].call_tool(tool.original, dict(call.arguments))
        except TimeoutError:
            log.warning("%s: tool %s did not finish within %g s (tool_timeout)", tool.server, tool.original, timeout)
            return failed(f"the tool did not finish within {timeout:g} s and was cancelled")
        except MCPError as exc:
            if mcp_error_kind(exc) == "closed":
                self.gone[tool.server] = "it closed the connection"
                log.warning("%s: the server closed the connection; its tools now fail", tool.server)
                return failed(f"server '{tool.server}' closed the connection")
            return failed(str(exc))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            self.gone[tool.server] = "it closed the connection"
            return failed(f"server '{tool.server}' closed the connection")
        except Exception as exc:  # the SDK's own checks (output schema, validation): the model is told
            log.warning("%s: tool %s failed: %s", tool.server, tool.original, exc)
            return failed(f"{type(exc).__name__}: {exc}")
        text = model_text(result)
        duration = time.perf_counter() - started
        return ToolOutcome(f"Error: {text}" if result.is_error else text, bool(result.is_error), duration, by)


def model_text(result: types.CallToolResult) -> str:
    """A tool result as the model reads it: text blocks as they are, structured content as
    JSON, and for other content (images, audio, resources) a line saying what it is, never
    its base64 data."""
    parts: list[str] = []
    for block in result.content:
        if isinstance(block, types.TextContent):
            parts.append(block.text)
        elif isinstance(block, types.ImageContent | types.AudioContent):
            parts.append(f"[{block.type}: {block.mime_type}, about {len(block.data) * 3 // 4} bytes, not shown]")
        elif isinstance(block, types.EmbeddedResource):
            inner = block.resource
            shown = inner.text if isinstance(inner, types.TextResourceContents) else "(binary, not shown)"
            parts.append(f"[resource {inner.uri}]\n{shown}")
        elif isinstance(block, types.ResourceLink):
            parts.append(f"[resource link {block.uri}: {block.name}]")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False))
    return "\n".join(parts)


def run_id() -> str:
    """An id for one run's audit lines: the process and the time it started."""
    return f"run-{os.getpid()}-{int(time.time())}"
