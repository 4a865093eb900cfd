"""A downstream server as `serve` keeps it, and helpers for what its servers list.

``Downstream`` holds one server's connection while it lasts and why it is not available;
``all_pages`` reads a paginated listing (bounded); ``exposed_names`` names the tools of
several servers without collisions (`serve` and `run` alike); ``merged`` keeps old routes
routable; ``headline`` puts a multi-line problem on one log line.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
from mcp import Client, types
from mcp.shared.exceptions import MCPError

from localsample.client import ServerSpec
from localsample.errors import INTERNAL_ERROR, ServerError

T = TypeVar("T")

SEPARATOR = "__"
"""Between a server's name and a tool (or prompt) name that another server also uses."""


class Downstream:
    """One downstream server: its client while connected, and why it is not available."""

    def __init__(self, spec: ServerSpec) -> None:
        self.spec = spec
        self.client: Client | None = None
        self.capabilities: types.ServerCapabilities | None = None
        self.failure: ServerError | None = None
        """Why it could not connect (None once connected)."""
        self.gone: str | None = None
        """Why it is not available: it failed to connect, went away, or serve is stopping."""
        self.stop = anyio.Event()
        """Set to close the connection."""
        self.settled = anyio.Event()
        """Set once connected, or once connecting has failed."""

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def alive(self) -> bool:
        return self.client is not None and self.gone is None

    def offers(self, capability: str) -> bool:
        """Whether the server declared ``capability`` (``tools``, ``prompts``, ``resources``)."""
        return self.capabilities is not None and getattr(self.capabilities, capability, None) is not None

    def connected(self, client: Client) -> None:
        self.client = client
        self.capabilities = client.server_capabilities
        self.settled.set()

    def end(self, reason: str) -> bool:
        """Stop using the server (``reason`` says why) and close its connection; returns
        False when it had already ended."""
        if self.gone is not None:
            return False
        self.gone = reason
        self.stop.set()
        return True

    def require(self) -> Client:
        if self.client is None or self.gone is not None:
            raise MCPError(
                INTERNAL_ERROR,
                f"downstream server '{self.name}' is not available ({self.gone or 'not connected'}); "
                "fix: check its output above, then restart localsample serve",
            )
        return self.client


async def all_pages(fetch: Callable[[str | None], Awaitable[Any]], items: str) -> list[Any]:
    """Every item of a paginated list (bounded, so a broken paginator cannot hang us)."""
    found: list[Any] = []
    cursor: str | None = None
    for _ in range(100):
        page = await fetch(cursor)
        found.extend(getattr(page, items))
        cursor = page.next_cursor
        if not cursor:
            break
    return found


def exposed_names(listed: list[tuple[str, str]]) -> list[str]:
    """The names to show for ``(server, name)`` pairs: a name only one server uses stays as
    it is; one that several use becomes ``SERVER__NAME`` for each of them."""
    counts: dict[str, int] = {}
    for _, name in listed:
        counts[name] = counts.get(name, 0) + 1
    return [name if counts[name] == 1 else f"{server}{SEPARATOR}{name}" for server, name in listed]


def headline(problem: str) -> str:
    """A problem on one line: a message that goes on with more lines (a server's last
    stderr lines, which were passed through to our stderr already) loses them and the
    clause that introduces them."""
    first, *more = problem.splitlines() or [""]
    return first.rsplit(";", 1)[0] if more else first


def merged(old: dict[str, T], new: dict[str, T]) -> dict[str, T]:
    """Routes from a new listing over the old ones. Old names stay routable (a server that
    went away answers with a clear error; a name whose prefix a listing dropped still
    reaches its tool)."""
    return old | new
