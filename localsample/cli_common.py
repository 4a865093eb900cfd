"""What every `localsample` command shares: the error boundary, logging, the runtime,
the `--json` option and the output helpers.

Commands raise :class:`~localsample.errors.LocalsampleError` and never print errors
themselves: :class:`ErrorBoundary`, the command group behind every Typer app of the CLI,
turns one (also one inside an anyio exception group) into ``error: <message>`` on stderr
and exit status 1, and an interrupt into exit status 130. It sits in the command group,
not in ``main()``, so Typer's test runner, which invokes the app directly, sees exactly
what a user sees.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Annotated, Any, TypeVar

import anyio
import typer
from typer.core import TyperGroup

from localsample.client import first_cause
from localsample.errors import LocalsampleError
from localsample.runtime import Runtime
from localsample.settings import Settings, load_settings

T = TypeVar("T")

INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT), as shells report it."""

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
"""The `--json` flag, the same for every command that has one."""


class ErrorBoundary(TyperGroup):
    """A command group that turns expected failures into one line on stderr and an exit status."""

    def invoke(self, ctx: Any) -> Any:  # ctx: click's Context (newer Typer versions vendor click)
        try:
            return super().invoke(ctx)
        except BaseException as exc:  # task groups wrap errors in exception groups
            cause = first_cause(exc)
            if isinstance(cause, LocalsampleError):
                typer.echo(f"error: {cause}", err=True)
                raise typer.Exit(1) from None
            if isinstance(cause, KeyboardInterrupt):
                typer.echo("error: interrupted", err=True)
                raise typer.Exit(INTERRUPTED) from None
            raise


def command_group(**kwargs: Any) -> typer.Typer:
    """A Typer app (or sub-app) whose errors go through :class:`ErrorBoundary`."""
    return typer.Typer(cls=ErrorBoundary, no_args_is_help=True, **kwargs)


def setup_logging(level: str = "info") -> None:
    """Every log line goes to stderr: stdout belongs to results (and to MCP in `serve`)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("localsample: %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)  # libraries (httpx, mcp, huggingface_hub) speak only when it matters
    logging.getLogger("localsample").setLevel(level.upper())


def settings_with_logging() -> Settings:
    """The effective settings, with logging set up at their level."""
    settings = load_settings()
    setup_logging(settings.log_level)
    return settings


def make_runtime() -> Runtime:
    """Settings, catalog and model pool for one command, with logging set up."""
    return Runtime(settings_with_logging())


def run_async(func: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine function on a fresh event loop; its errors, even inside exception
    groups, reach :class:`ErrorBoundary`."""
    return anyio.run(func)


def print_json(data: object) -> None:
    """One JSON document on stdout."""
    typer.echo(json.dumps(data, indent=2))


def output(data: object, as_json: bool, lines: Callable[[], Iterable[str]]) -> None:
    """Print ``data`` as JSON with ``--json``, else the text lines ``lines()`` renders."""
    if as_json:
        print_json(data)
        return
    for line in lines():
        typer.echo(line)


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """Left-aligned columns two spaces apart, the header first, no trailing spaces."""
    body = [header, *rows]
    if any(len(row) != len(header) for row in body):
        raise ValueError(f"every row of the table needs {len(header)} cells")
    widths = [max(len(row[i]) for row in body) for i in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in body]
