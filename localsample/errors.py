"""One error hierarchy for localsample.

Every error carries a ``problem`` (what went wrong, with the numbers and names that
matter) and a ``fix`` (what the user can do about it). ``str(error)`` joins the two, so a
message printed by the CLI or sent to an MCP server always names the fix.

    LocalsampleError
    ├── ConfigError              settings file or environment is invalid
    ├── CatalogError             models.toml is invalid (file, model id, field)
    ├── ModelError
    │   ├── UnknownModelError    no catalog entry with that id, alias or hint
    │   ├── ModelFileError       the GGUF is missing, unreadable or corrupt
    │   └── HubError             a pull failed (Hugging Face hub or package index)
    ├── RequestError             a sampling request we refuse (MCP -32602)
    │   ├── UnsupportedContentError   image/audio/tools we cannot serve yet
    │   └── ContextOverflowError      prompt + max tokens > n_ctx (with the numbers)
    ├── RejectedError            a human or a policy said no (MCP -1)
    │   └── RateLimitError       a server's requests/tokens per minute ran out
    ├── EngineError              llama.cpp failed while generating (MCP -32603)
    │   └── BusyError            too many requests waiting for a model (MCP -32000)
    ├── GenerationCancelled      the request was cancelled while waiting or generating
    ├── DaemonError              `localsample daemon`: none runs, one runs already, no socket
    └── ServerError              a downstream MCP server failed or misbehaved
        └── ServerSpecError      a --server value we cannot parse

The MCP error code for each branch lives on the class (``mcp_code``); ``sampling.py``
turns any of these into ``ErrorData`` without a lookup table of its own. Every error
code localsample sends or reads is named here, once.
"""

from __future__ import annotations

from typing import ClassVar

from mcp_types import CONNECTION_CLOSED, INTERNAL_ERROR, INVALID_PARAMS, INVALID_REQUEST, METHOD_NOT_FOUND, PARSE_ERROR

USER_REJECTED = -1
"""A human or a policy rejected a sampling request (the spec's example code)."""

SERVER_BUSY = -32000
"""Too many requests wait for a model; retry later (JSON-RPC's server-error range)."""

__all__ = [
    "CONNECTION_CLOSED",
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "METHOD_NOT_FOUND",
    "PARSE_ERROR",
    "SERVER_BUSY",
    "USER_REJECTED",
    "BusyError",
    "CatalogError",
    "ConfigError",
    "ContextOverflowError",
    "DaemonError",
    "EngineError",
    "GenerationCancelled",
    "HubError",
    "LocalsampleError",
    "ModelError",
    "ModelFileError",
    "RateLimitError",
    "RejectedError",
    "RequestError",
    "ServerError",
    "ServerSpecError",
    "ToolCallError",
    "UnknownModelError",
    "UnsupportedContentError",
    "is_connection_closed",
    "rebuilt",
]


class LocalsampleError(Exception):
    """Base of every error localsample raises on purpose."""

    mcp_code: ClassVar[int] = INTERNAL_ERROR

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.fix:
            return f"{self.problem}\n  fix: {self.fix}"
        return self.problem

    def one_line(self) -> str:
        """The message on a single line, for JSON-RPC errors and log lines."""
        return f"{self.problem} (fix: {self.fix})" if self.fix else self.problem


class ConfigError(LocalsampleError):
    """The settings file or a LOCALSAMPLE_* variable is invalid."""


class CatalogError(LocalsampleError):
    """A catalog file (models.toml) is invalid."""


class ModelError(LocalsampleError):
    """Something is wrong with a model: unknown, missing or unloadable."""


class UnknownModelError(ModelError):
    """No catalog entry matches the requested id, alias or hint."""

    mcp_code = INVALID_PARAMS


class ModelFileError(ModelError):
    """A model's GGUF file is missing, unreadable or not a valid GGUF."""


class HubError(ModelError):
    """A pull failed (Hugging Face hub or package index): unknown repo/file, offline, disk full..."""


class RequestError(LocalsampleError):
    """A sampling request that is malformed or that we refuse to serve."""

    mcp_code = INVALID_PARAMS


class UnsupportedContentError(RequestError):
    """The request carries content (image, audio, tools) that is not supported yet."""


class ContextOverflowError(RequestError):
    """Prompt tokens plus max tokens do not fit the model's context window."""

    def __init__(self, *, prompt_tokens: int, max_tokens: int, n_ctx: int, model_id: str) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.n_ctx = n_ctx
        super().__init__(
            f"prompt ({prompt_tokens} tokens) + maxTokens ({max_tokens}) = "
            f"{prompt_tokens + max_tokens} exceeds the context window of '{model_id}' "
            f"(n_ctx = {n_ctx})",
            f"lower maxTokens to at most {max(n_ctx - prompt_tokens, 0)}, shorten the prompt, "
            f"or raise n_ctx in the [models.load] table of '{model_id}'",
        )


class RejectedError(LocalsampleError):
    """A request a human or a policy rejected (rate limit, approve = deny, a "no")."""

    mcp_code = USER_REJECTED


class RateLimitError(RejectedError):
    """A request over a server's requests_per_minute or tokens_per_minute (HTTP 429 in the
    OpenAI-compatible API; to MCP it is a rejection like any other)."""


class GenerationCancelled(LocalsampleError):
    """The request was cancelled (by its caller) while it waited or generated."""

    def __init__(self, problem: str = "the request was cancelled", fix: str | None = None) -> None:
        super().__init__(problem, fix)


class EngineError(LocalsampleError):
    """llama.cpp failed while loading or generating."""


class ToolCallError(EngineError):
    """The model's answer holds no complete, valid tool call (maxTokens ran out in it, or
    its input breaks a schema keyword the grammar cannot enforce)."""


class BusyError(EngineError):
    """Too many requests are already waiting for a model: retry later."""

    mcp_code = SERVER_BUSY


class DaemonError(LocalsampleError):
    """`localsample daemon`: no daemon runs (to stop), one runs already (to start), or its
    socket cannot be made."""


class ServerError(LocalsampleError):
    """A downstream MCP server failed, exited, or returned an error."""


class ServerSpecError(ServerError):
    """A --server value that cannot be parsed."""


class AgentError(LocalsampleError):
    """`run` could not finish: the step limit was reached, a saved conversation cannot be
    read, or the tools asked for do not exist."""


def is_connection_closed(code: int, message: str) -> bool:
    """Whether an MCP error (its code and message) means the peer's connection is gone.

    The SDK reports a closed connection as CONNECTION_CLOSED (-32000) "Connection closed";
    a server may use -32000 for its own errors too, hence the message check.
    """
    return code == CONNECTION_CLOSED and "connection closed" in message.lower()


def rebuilt(kind: str, problem: str, fix: str | None) -> LocalsampleError:
    """An error another localsample process sent (the daemon, to an attached client) as its
    own class again, so that MCP codes and handling are the same as in-process; a class
    this version does not know becomes a plain ``LocalsampleError``."""
    cls = globals().get(kind)
    if not (isinstance(cls, type) and issubclass(cls, LocalsampleError)):
        cls = LocalsampleError
    error = cls.__new__(cls)
    LocalsampleError.__init__(error, problem, fix)
    return error
