"""Connecting to MCP servers (stdio or Streamable HTTP) with localsample's sampling callback.

A ``--server`` value is ``[NAME=]SPEC``: SPEC is an ``http(s)://`` URL, or a command line
split like a shell would (``"python my_server.py --flag 'two words'"``). NAME defaults to
the URL's host or the command's script name.
"""

from __future__ import annotations

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

PROTOCOLS = ("auto", "legacy", "2026-07-28")
"""``auto``: 2026-07-28 where the server offers it, else the initialize handshake;
``legacy``: always the handshake (≤ 2025-11-25); or pin 2026-07-28."""
PROTOCOL_FIX = (
    "use auto (default), legacy (the initialize handshake, for servers that push "
    "sampling with session.create_message) or 2026-07-28"
)
NO_BACK_CHANNEL = "no back-channel for server-initiated requests"
"""What an mcp>=2 server says when it pushes sampling on a 2026-07-28 connection."""

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


def make_client(
    spec: ServerSpec,
    sampling: SamplingFnT,
    *,
    elicitation: ElicitationFnT | None = None,
    list_roots: ListRootsFnT | None = None,
    logging_callback: LoggingFnT | None = None,
    message_handler: MessageHandlerFnT | None = None,
) -> Client:
    """An unopened ``mcp.Client`` for ``spec`` that answers sampling with ``sampling``.

    In ``auto`` mode the client speaks 2026-07-28 to servers that offer it and falls back
    to the initialize handshake otherwise; sampling reaches ``sampling`` either way.
    """
    return Client(
        spec.target(),
        sampling_callback=sampling,
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
        return ServerError(
            f"server '{spec.name}' closed the connection (it exited or crashed; its own error output, "
            "if any, is above)",
            "run the server command by itself to see why it stops"
            if spec.url is None
            else "check that the server is still running",
        )
    if kind == "no_back_channel":
        return ServerError(
            f"server '{spec.name}' could not send its sampling request: {exc}",
            "this server pushes sampling requests; run again with --protocol legacy",
        )
    return ServerError(f"server '{spec.name}' answered with an error: {exc}", "check the tool name and arguments")


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
) -> types.CallToolResult:
    """Connect, call one tool (answering its sampling with ``sampling``), disconnect."""
    try:
        async with make_client(spec, sampling) as client:
            found = await find_tool(client, tool)
            arguments = parse_tool_args(pairs or [], json_args, found.input_schema)
            return await client.call_tool(tool, arguments)
    except ServerError:
        raise
    except MCPError as exc:
        raise mcp_error(spec, exc) from exc
    except Exception as exc:
        cause = first_cause(exc)
        if isinstance(cause, ServerError):
            raise cause from exc
        if isinstance(cause, MCPError):
            raise mcp_error(spec, cause) from exc
        raise connect_error(spec, cause) from exc
