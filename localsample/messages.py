"""Checking a line a server wrote: a JSON-RPC message, or why not and how to answer.

:func:`read_message` takes one line as it came from a server: a well-formed message is
parsed exactly as the SDK parses it (and costs about the same); a malformed one becomes a
:class:`Malformed` that says which JSON-RPC 2.0 error answers it (-32700 parse error,
-32600 invalid request, -32602 for a lone UTF-16 surrogate in ``params``) and with which
id. The transports (transport.py, transport_http.py) decide what to do with it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import pydantic_core
from mcp.shared.message import SessionMessage
from mcp_types import (
    ErrorData,
    JSONRPCError,
    JSONRPCNotification,
    JSONRPCRequest,
    RequestId,
    jsonrpc_message_adapter,
)
from mcp_types.methods import SERVER_REQUESTS
from pydantic import ValidationError

from localsample.errors import INVALID_PARAMS, INVALID_REQUEST, PARSE_ERROR

MAX_DEPTH = 200
"""Deepest nesting of arrays and objects accepted in one message (the SDK's parser limit)."""

MessageKind = Literal["request", "notification", "response"]
_MISSING: Any = object()


@dataclass(frozen=True)
class Malformed:
    """Why a line from a server is not a valid JSON-RPC message, and how to answer it.

    ``kind`` says what the line looked like: a request (or something unrecognisable) gets
    an error reply with ``ident`` (``None`` is sent as ``null``); a notification gets no
    reply; a response fails the pending request ``ident``, if any.
    """

    code: int
    reason: str
    ident: RequestId | None
    kind: MessageKind

    def reply(self) -> SessionMessage:
        """The JSON-RPC error answering this message."""
        error = ErrorData(code=self.code, message=f"malformed message: {self.reason}")
        return SessionMessage(JSONRPCError(jsonrpc="2.0", id=self.ident, error=error))

    def failure(self, server: str) -> SessionMessage:
        """For a malformed response: the error that fails the pending request ``ident``."""
        error = ErrorData(code=self.code, message=f"server '{server}' sent a malformed response: {self.reason}")
        return SessionMessage(JSONRPCError(jsonrpc="2.0", id=self.ident, error=error))

    def log_line(self, server: str) -> str:
        """The one line logged for this message from ``server``: what it was and what we did."""
        if self.kind == "request":
            return f"server '{server}' sent a malformed request ({self.reason}); answered {self.code}"
        if self.kind == "response" and self.ident is not None:
            return f"server '{server}' sent a malformed response to request {self.ident!r} ({self.reason})"
        return f"server '{server}' sent a malformed {self.kind} ({self.reason}); ignored it"


def read_message(line: bytes) -> SessionMessage | Malformed:
    """Check and parse one line from a server.

    A well-formed line costs what it costs the SDK (one ``validate_json``) plus an
    ``isinstance``; only lines the SDK refuses, and notifications that mention ``"id"``
    (the SDK reads a request whose id is unusable as a notification), take the slow path.
    The params of a sampling request are checked too (``checked_params``).
    """
    try:
        message = jsonrpc_message_adapter.validate_json(line, by_name=False)
    except ValueError:  # pydantic's ValidationError included
        return checked_params(check_message(line))
    if isinstance(message, JSONRPCNotification) and b'"id"' in line:
        return checked_params(check_message(line))
    return checked_params(SessionMessage(message))


CHECKED_METHODS = ("sampling/createMessage",)
"""Requests whose params are checked here, so that the error names the field: the SDK
answers a request it cannot validate with a bare "Invalid request parameters"."""


def checked_params(read: SessionMessage | Malformed) -> SessionMessage | Malformed:
    """A request of ``CHECKED_METHODS`` whose params fit no protocol version's schema becomes
    a -32602 that names the field (e.g. ``params.toolChoice.mode``) and what is wrong."""
    if isinstance(read, Malformed):
        return read
    message = read.message
    if not isinstance(message, JSONRPCRequest) or message.method not in CHECKED_METHODS:
        return read
    body = {"jsonrpc": "2.0", "id": 0, "method": message.method, "params": message.params or {}}
    problem: ValidationError | None = None
    for (method, _version), surface in SERVER_REQUESTS.items():  # oldest version first
        if method != message.method:
            continue
        try:
            surface.model_validate(body, by_name=False)
            return read
        except ValidationError as exc:
            problem = exc
    if problem is None:
        return read
    first = problem.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    got = repr(first.get("input"))[:80]
    return Malformed(INVALID_PARAMS, f"{where}: {first['msg']} (got {got})", message.id, "request")


def check_message(line: bytes | str) -> SessionMessage | Malformed:
    """Say exactly what is wrong with a line, or parse it if nothing is."""
    try:
        data = pydantic_core.from_json(line)
    except ValueError:
        return reread(line)
    problem = envelope_problem(data)
    if problem is not None:
        return problem
    return to_session_message(data)


def reread(line: bytes | str) -> SessionMessage | Malformed:
    """For a line ``pydantic_core.from_json`` refused: lone surrogates and deep nesting,
    which ``json.loads`` reads, are told apart from lines that are not JSON at all."""
    try:
        data = json.loads(line)
    except RecursionError:
        return Malformed(PARSE_ERROR, f"nested deeper than {MAX_DEPTH} levels", None, "request")
    except ValueError as exc:  # includes invalid UTF-8
        return Malformed(PARSE_ERROR, f"not JSON ({exc})", None, "request")
    if too_deep(data, MAX_DEPTH):
        return Malformed(PARSE_ERROR, f"nested deeper than {MAX_DEPTH} levels", None, "request")
    problem = envelope_problem(data)
    if problem is not None:
        return problem
    assert isinstance(data, dict)  # envelope_problem refuses anything else
    kind = message_kind(data)
    for key in ("id", "method", "params", "result", "error"):
        if key in data and has_lone_surrogate(data[key]):
            ident = None if key == "id" else data.get("id")
            code = INVALID_PARAMS if key == "params" else INVALID_REQUEST
            return Malformed(code, f'a lone UTF-16 surrogate in "{key}"', ident, kind)
    if any(has_lone_surrogate(key) for key in data):
        return Malformed(INVALID_REQUEST, "a lone UTF-16 surrogate in a member name", data.get("id"), kind)
    return to_session_message(data)


def to_session_message(data: dict[str, Any]) -> SessionMessage | Malformed:
    """The SDK's model of an envelope that passed our checks (its validation has the last word)."""
    try:
        return SessionMessage(jsonrpc_message_adapter.validate_python(data, by_name=False))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"][1:]) or "message"
        return Malformed(INVALID_REQUEST, f"{where}: {first['msg']}", data.get("id"), message_kind(data))


def usable_id(value: object) -> bool:
    """Whether ``value`` is an id we can echo: an integer (not a bool) or a string."""
    return type(value) is int or type(value) is str


def message_kind(data: dict[str, Any]) -> MessageKind:
    if "method" in data:
        return "request" if "id" in data else "notification"
    if "result" in data or "error" in data:
        return "response"
    return "request"


def json_kind(value: object) -> str:
    """The JSON name of a parsed value's type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def envelope_problem(data: object) -> Malformed | None:
    """What is wrong with a parsed message's envelope (``jsonrpc``, ``id``, ``method``,
    ``params``), or ``None``. Only dictionary lookups: this runs on every message."""
    if type(data) is not dict:
        return Malformed(INVALID_REQUEST, f"a JSON {json_kind(data)}, not an object", None, "request")
    kind = message_kind(data)
    ident = data.get("id", _MISSING)
    echo = ident if usable_id(ident) else None
    version = data.get("jsonrpc", _MISSING)
    if version != "2.0":
        shown = "missing" if version is _MISSING else f"{json.dumps(version)[:40]}"
        return Malformed(INVALID_REQUEST, f'"jsonrpc" is {shown}, not "2.0"', echo, kind)
    if ident is not _MISSING and echo is None and not (ident is None and kind == "response" and "error" in data):
        return Malformed(INVALID_REQUEST, f'"id" is a JSON {id_kind(ident)}, not an integer or a string', None, kind)
    if kind == "response":
        return None
    if "method" not in data:
        return Malformed(INVALID_REQUEST, 'no "method", "result" or "error"', echo, kind)
    if type(data["method"]) is not str:
        return Malformed(INVALID_REQUEST, f'"method" is a JSON {json_kind(data["method"])}', echo, kind)
    params = data.get("params")
    if params is not None and type(params) is not dict:
        return Malformed(INVALID_REQUEST, f'"params" is a JSON {json_kind(params)}, not an object', echo, kind)
    return None


def id_kind(value: object) -> str:
    """``json_kind`` that tells a fractional or float-written number from an integer."""
    return "float" if isinstance(value, float) else json_kind(value)


def has_lone_surrogate(value: object) -> bool:
    """Whether any string in ``value`` (keys included) holds an unpaired UTF-16 surrogate."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def too_deep(value: object, limit: int) -> bool:
    """Whether arrays and objects in ``value`` nest deeper than ``limit``."""
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth >= limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False
