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
    │   └── HubError             pulling from the Hugging Face hub failed
    ├── RequestError             a sampling request we refuse (MCP -32602)
    │   ├── UnsupportedContentError   image/audio/tools we cannot serve yet
    │   └── ContextOverflowError      prompt + max tokens > n_ctx (with the numbers)
    ├── EngineError              llama.cpp failed while generating (MCP -32603)
    │   └── BusyError            too many requests waiting for a model (MCP -32000)
    └── ServerError              a downstream MCP server failed or misbehaved
        └── ServerSpecError      a --server value we cannot parse

The MCP error code for each branch lives on the class (``mcp_code``); ``sampling.py``
turns any of these into ``ErrorData`` without a lookup table of its own.
"""

from __future__ import annotations

from typing import ClassVar

INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603


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
    """A pull from the Hugging Face hub failed: unknown repo/file, offline, disk full..."""


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


class EngineError(LocalsampleError):
    """llama.cpp failed while loading or generating."""


class BusyError(EngineError):
    """Too many requests are already waiting for a model: retry later."""

    mcp_code = -32000


class ServerError(LocalsampleError):
    """A downstream MCP server failed, exited, or returned an error."""


class ServerSpecError(ServerError):
    """A --server value that cannot be parsed."""
