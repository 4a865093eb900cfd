"""Connecting to MCP servers (stdio or Streamable HTTP) with localsample's sampling callback.

A ``--server`` value is ``[NAME=]SPEC``: SPEC is an ``http(s)://`` URL, or a command line
split like a shell would (``"python my_server.py --flag 'two words'"``). NAME defaults to
the URL's host or the command's script name.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from mcp import Client, StdioServerParameters, types
from mcp.client.session import ElicitationFnT, ListRootsFnT, LoggingFnT, MessageHandlerFnT, SamplingFnT
from mcp.shared.exceptions import MCPError

from localsample import __version__
from localsample.errors import INVALID_REQUEST, ServerError, ServerSpecError, is_connection_closed
from localsample.transport import GuardedTransport, StdioTransport
from localsample.transport_http import HttpTransport

PROTOCOLS = ("auto", "legacy", "2026-07-28")
"""``auto``: 2026-07-28 where the server offers it, else the initialize handshake;
``legacy``: always the handshake (≤ 2025-11-25); or pin 2026-07-28."""
PROTOCOL_FIX = (
    "use auto (default), legacy (the initialize handshake, for servers that push "
    "sampling with session.create_message) or 2026-07-28"
)
NO_BACK_CHANNEL = "no back-channel for server-initiated requests"
"""What an mcp>=2 server says when it pushes sampling on a 2026-07-28 connection."""

CONNECT_TIMEOUT = 30.0
"""Seconds a server has to start and answer the handshake (initialize or server/discover)."""
TIMEOUT_FIX = (
    "check that the command starts an MCP server that talks on stdio (run it by itself); "
    "a server that is just slow to start needs a larger connect_timeout setting"
)

NAME_PREFIX = re.compile(r"^(?P<name>[A-Za-z][A-Za-z0-9_-]{0,63})=(?P<spec>\S.*)$")


@dataclass(frozen=True)
class ServerSpec:
    """One downstream server: a command to run over stdio, or a URL."""

    name: str
    command: list[str] = field(default_factory=list)
    url: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    protocol: str = "auto"

    @classmethod
    def parse(
        cls,
        value: str,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        protocol: str = "auto",
    ) -> ServerSpec:
        if protocol not in PROTOCOLS:
            raise ServerSpecError(f"--protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}", PROTOCOL_FIX)
        text = value.strip()
        named = NAME_PREFIX.match(text)
        name = named["name"] if named else None
        spec = named["spec"] if named else text
        if not spec:
            raise ServerSpecError("--server is empty", 'give a command ("python server.py") or an http(s):// URL')
        if spec.startswith(("http://", "https://")):
            host = urlsplit(spec).hostname
            if not host:
                raise ServerSpecError(
                    f"--server {value!r}: the URL has no host", "give a URL like http://127.0.0.1:8000/mcp"
                )
            return cls(name=name or host, url=spec, protocol=protocol)
        try:
            command = shlex.split(spec)
        except ValueError as exc:
            raise ServerSpecError(f"--server {value!r}: {exc}", "check the quotes in the command line") from exc
        if cwd is not None and not cwd.is_dir():
            raise ServerSpecError(f"--cwd {cwd} is not a directory", "give an existing directory")
        return cls(
            name=name or _default_name(command), command=command, env=dict(env or {}), cwd=cwd, protocol=protocol
        )

    def target(self) -> StdioServerParameters | str:
        """What ``mcp.Client`` connects to."""
        if self.url is not None:
            return self.url
        # The server sees the environment it would see if the host had started it itself.
        environment = dict(os.environ) | dict(self.env)
        return StdioServerParameters(command=self.command[0], args=self.command[1:], env=environment, cwd=self.cwd)

    def describe(self) -> str:
        return self.url or shlex.join(self.command)


def _default_name(command: list[str]) -> str:
    scripts = [Path(a).stem for a in command[1:] if re.search(r"\.(py|js|mjs|ts)$", a)]
    base = scripts[-1] if scripts else Path(command[0]).name
    cleaned = re.sub(r"[^A-Za-z0-9_-]", "-", base).strip("-") or "server"
    return cleaned[:64]


@dataclass(kw_only=True)
class ServerClient(Client):
    """``mcp.Client`` over one of localsample's transports (see ``localsample.transport``).

    Entering it is bounded by the transport's connect timeout, and an error while
    connecting becomes a ``ServerError`` that names the server (with the last lines it
    wrote to stderr, for a stdio server that stopped).
    """

    spec: ServerSpec
    ready: bool = field(default=False, init=False)

    @property
    def transport(self) -> StdioTransport | GuardedTransport:
        assert isinstance(self.server, StdioTransport | GuardedTransport)
        return self.server

    async def __aenter__(self) -> ServerClient:
        try:
            await super().__aenter__()
        except Exception as exc:
            raise self.failure(exc) from exc
        self.transport.watch.connected()
        self.ready = True
        return self

    def stderr_tail(self) -> list[str]:
        """The last lines the server wrote to stderr (complete once the client has exited)."""
        return self.transport.stderr_tail()

    def failure(self, exc: BaseException) -> ServerError:
        """A clear error for ``exc``, raised while connecting or while using the connection."""
        cause = first_cause(exc)
        if isinstance(cause, ServerError):
            return cause
        spec, tail = self.spec, self.stderr_tail()
        exit_status = self.transport.returncode if isinstance(self.transport, StdioTransport) else None
        if self.transport.watch.timed_out:
            timeout = self.transport.watch.timeout
            problem = f"server '{spec.name}' did not answer the MCP handshake (initialize or server/discover)"
            return with_stderr(ServerError(f"{problem} within {timeout:g} s", TIMEOUT_FIX), tail)
        if isinstance(cause, MCPError):
            if mcp_error_kind(cause) == "closed":
                return closed_error(spec, tail, exit_status, starting=not self.ready)
            if self.ready:
                return mcp_error(spec, cause)
        return with_stderr(connect_error(spec, cause), tail)


def make_client(
    spec: ServerSpec,
    sampling: SamplingFnT,
    *,
    elicitation: ElicitationFnT | None = None,
    list_roots: ListRootsFnT | None = None,
    logging_callback: LoggingFnT | None = None,
    message_handler: MessageHandlerFnT | None = None,
    connect_timeout: float = CONNECT_TIMEOUT,
) -> ServerClient:
    """An unopened client for ``spec`` that answers sampling with ``sampling``.

    In ``auto`` mode the client speaks 2026-07-28 to servers that offer it and falls back
    to the initialize handshake otherwise; sampling reaches ``sampling`` either way.
    Entering it raises ``ServerError`` if the server has not connected after
    ``connect_timeout`` seconds. Malformed JSON-RPC from a server (stdio or HTTP) is
    answered with a JSON-RPC error and logged, and does not end the connection.
    """
    target = spec.target()
    transport: StdioTransport | GuardedTransport
    if isinstance(target, str):
        transport = HttpTransport(target, name=spec.name, connect_timeout=connect_timeout)
    else:
        transport = StdioTransport(target, name=spec.name, connect_timeout=connect_timeout)
    return ServerClient(
        transport,
        spec=spec,
        sampling_callback=sampling,
        # tools in sampling requests (2025-11-25); includeContext is answered as "none"
        sampling_capabilities=types.SamplingCapability(tools=types.SamplingToolsCapability()),
        elicitation_callback=elicitation,
        list_roots_callback=list_roots,
        logging_callback=logging_callback,
        message_handler=message_handler,
        client_info=types.Implementation(name="localsample", version=__version__),
        mode=spec.protocol,
        cache=None,
    )


def connect_error(spec: ServerSpec, exc: BaseException) -> ServerError:
    """A clear error for a server that could not be started or reached."""
    if isinstance(exc, ServerError):
        return exc
    if isinstance(exc, FileNotFoundError):
        return ServerError(
            f"server '{spec.name}': command not found: {spec.command[0]}",
            "check the --server command line (is the program installed and on PATH?)",
        )
    detail = str(exc) or type(exc).__name__
    where = spec.describe()
    return ServerError(
        f"server '{spec.name}' ({where}) failed: {detail}",
        "run the server command by itself to see its own error output"
        if spec.url is None
        else "check that the server is running and the URL is right",
    )


def parse_tool_args(pairs: list[str], json_args: str | None, schema: Mapping[str, Any] | None) -> dict[str, Any]:
    """``--args JSON`` then ``--arg key=value`` pairs, typed by the tool's input schema.

    A value for a string property stays a string; for number, integer, boolean, array or
    object properties it is read as JSON (``--arg count=3`` gives 3).
    """
    arguments: dict[str, Any] = {}
    if json_args:
        try:
            loaded = json.loads(json_args)
        except json.JSONDecodeError as exc:
            raise ServerError(f"--args is not valid JSON: {exc}", "pass an object, e.g. --args '{\"n\": 3}'") from exc
        if not isinstance(loaded, dict):
            raise ServerError("--args must be a JSON object", "pass an object, e.g. --args '{\"n\": 3}'")
        arguments.update(loaded)
    properties: Mapping[str, Any] = (schema or {}).get("properties") or {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ServerError(f"--arg {pair!r} is not key=value", "write --arg name=value")
        kind = properties.get(key, {}).get("type")
        if kind == "string" or (kind is None and key in properties):
            arguments[key] = raw
            continue
        try:
            arguments[key] = json.loads(raw)
        except json.JSONDecodeError:
            if kind in ("number", "integer", "boolean", "array", "object"):
                raise ServerError(
                    f"--arg {key}: {raw!r} is not a valid {kind}", f"give {key} as JSON of type {kind}"
                ) from None
            arguments[key] = raw
    return arguments


async def find_tool(client: Client, name: str) -> types.Tool:
    tools: list[types.Tool] = []
    cursor: str | None = None
    for _ in range(100):  # a server that pages forever cannot hang us
        page = await client.list_tools(cursor=cursor)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if not cursor:
            break
    for tool in tools:
        if tool.name == name:
            return tool
    known = ", ".join(sorted(t.name for t in tools)) or "none"
    raise ServerError(f"the server has no tool '{name}' (its tools: {known})", "use one of the tools listed")


def tool_result_text(result: types.CallToolResult) -> str:
    """The text a person wants from a tool result: its text blocks, else its JSON."""
    texts = [block.text for block in result.content if isinstance(block, types.TextContent)]
    if texts:
        return "\n".join(texts)
    if result.structured_content is not None:
        return json.dumps(result.structured_content, indent=2)
    return json.dumps([block.model_dump(mode="json", by_alias=True) for block in result.content], indent=2)


McpErrorKind = Literal["closed", "no_back_channel", "other"]


def mcp_error_kind(exc: MCPError) -> McpErrorKind:
    """What an MCP error from (or about) a server means to us: its connection is gone, it
    could not push a sampling request on this transport, or an error of its own."""
    if is_connection_closed(exc.code, exc.message):
        return "closed"
    if exc.code == INVALID_REQUEST and NO_BACK_CHANNEL in exc.message:
        return "no_back_channel"
    return "other"


def mcp_error(spec: ServerSpec, exc: MCPError) -> ServerError:
    kind = mcp_error_kind(exc)
    if kind == "closed":
        return closed_error(spec, [], None, starting=False)
    if kind == "no_back_channel":
        return ServerError(
            f"server '{spec.name}' could not send its sampling request: {exc}",
            "this server pushes sampling requests; run again with --protocol legacy",
        )
    return ServerError(f"server '{spec.name}' answered with an error: {exc}", "check the tool name and arguments")


def closed_error(spec: ServerSpec, tail: list[str], exit_status: int | None, *, starting: bool) -> ServerError:
    """The server closed the connection; ``tail`` is the last of its stderr, if kept."""
    when = " during start-up" if starting else ""
    status = f", exit status {exit_status}" if exit_status else ""
    if spec.url is not None:
        return ServerError(
            f"server '{spec.name}' closed the connection{when}", "check that the server is still running"
        )
    if not tail:
        return ServerError(
            f"server '{spec.name}' closed the connection{when} (it exited or crashed{status}; "
            "its own error output, if any, is above)",
            "run the server command by itself to see why it stops",
        )
    fix = "run the server command by itself to see why it stops"
    if any("ModuleNotFoundError" in line or "ImportError" in line for line in tail):
        fix = (
            "install the missing module for the Python that runs the server, "
            "or start the server with the Python that has it"
        )
    return with_stderr(
        ServerError(f"server '{spec.name}' closed the connection{when} (it exited or crashed{status})", fix), tail
    )


def with_stderr(error: ServerError, tail: list[str]) -> ServerError:
    """``error`` with the server's last stderr lines added to its problem."""
    if not tail:
        return error
    lines = "\n".join(f"    | {line}" for line in tail)
    return ServerError(f"{error.problem}; the last lines it wrote to stderr:\n{lines}", error.fix)


def check_tool_args(tool: str, arguments: Mapping[str, Any], schema: Mapping[str, Any] | None) -> None:
    """Refuse arguments the tool's input schema does not name, and required ones missing.

    Checked only when the schema declares ``properties``; names outside them are allowed
    when ``additionalProperties`` (or ``patternProperties``) lets the tool take others.
    """
    properties = (schema or {}).get("properties")
    if not isinstance(properties, Mapping):
        return
    assert schema is not None
    names = sorted(str(name) for name in properties)
    problems: list[str] = []
    extra = schema.get("additionalProperties")
    if (extra is None or extra is False) and "patternProperties" not in schema:
        for key in (k for k in arguments if k not in properties):
            close = difflib.get_close_matches(key, names, n=1)
            problems.append(f"no argument '{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    required = schema.get("required")
    missing = [r for r in required if isinstance(r, str) and r not in arguments] if isinstance(required, list) else []
    if missing:
        problems.append("missing required " + ", ".join(f"'{m}'" for m in missing))
    if not problems:
        return
    shown = ", ".join(f"{n} (required)" if isinstance(required, list) and n in required else n for n in names)
    raise ServerError(
        f"tool '{tool}' arguments: {'; '.join(problems)} (its arguments: {shown or 'none'})",
        "pass the tool's own argument names: --arg NAME=VALUE or --args '{\"NAME\": ...}'",
    )


def first_cause(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups from anyio task groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


async def call_tool(
    spec: ServerSpec,
    tool: str,
    sampling: SamplingFnT,
    *,
    pairs: list[str] | None = None,
    json_args: str | None = None,
    connect_timeout: float = CONNECT_TIMEOUT,
) -> types.CallToolResult:
    """Connect, call one tool (answering its sampling with ``sampling``), disconnect.

    The arguments are checked against the tool's input schema before the call.
    """
    client = make_client(spec, sampling, connect_timeout=connect_timeout)
    try:
        async with client:
            found = await find_tool(client, tool)
            arguments = parse_tool_args(pairs or [], json_args, found.input_schema)
            check_tool_args(tool, arguments, found.input_schema)
            return await client.call_tool(tool, arguments)
    except ServerError:
        raise
    except Exception as exc:
        # Built after the client has exited, so the server's stderr is read to its end.
        raise client.failure(exc) from exc
