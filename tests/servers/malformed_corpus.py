"""The malformed server→client requests the misbehaving test servers send, and the replies
JSON-RPC 2.0 asks for. One list for every transport (stdio and Streamable HTTP).

Plain Python, no imports from the project: the servers run it as a script's neighbour.
"""

from __future__ import annotations

from typing import Any, NamedTuple

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
INVALID_PARAMS = -32602

SAMPLING: dict[str, Any] = {"messages": [{"role": "user", "content": {"type": "text", "text": "Hi."}}], "maxTokens": 5}
"""The params of the well-formed ``sampling/createMessage`` sent after the corpus."""
SURROGATE = '{"messages":[{"role":"user","content":{"type":"text","text":"a\\ud800b"}}],"maxTokens":5}'
DEEP = "[" * 10_000 + "]" * 10_000


class Case(NamedTuple):
    line: str
    """The message as the server writes it (one line, no newline)."""
    code: int
    """The error code of the client's reply."""
    ident: str | None
    """The id of the client's reply."""


def request(ident: str, params: str, method: str = "sampling/createMessage", version: str = '"2.0"') -> str:
    return f'{{"jsonrpc":{version},"id":{ident},"method":"{method}","params":{params}}}'


CASES: dict[str, Case] = {
    "params-list": Case(request('"params-list"', "[1, 2]"), INVALID_REQUEST, "params-list"),
    "params-string": Case(request('"params-string"', '"hello"'), INVALID_REQUEST, "params-string"),
    "lone-surrogate": Case(request('"lone-surrogate"', SURROGATE), INVALID_PARAMS, "lone-surrogate"),
    "deep": Case(request('"deep"', f'{{"x":{DEEP}}}'), PARSE_ERROR, None),
    "id-object": Case(request('{"a": 1}', "{}", method="ping"), INVALID_REQUEST, None),
    "id-list": Case(request("[1]", "{}", method="ping"), INVALID_REQUEST, None),
    "id-bool": Case(request("true", "{}", method="ping"), INVALID_REQUEST, None),
    "id-float": Case(request("1.5", "{}", method="ping"), INVALID_REQUEST, None),
    "jsonrpc-1.0": Case(request('"jsonrpc-1.0"', "{}", method="ping", version='"1.0"'), INVALID_REQUEST, "jsonrpc-1.0"),
    "not-json": Case("this is not json {", PARSE_ERROR, None),
}
