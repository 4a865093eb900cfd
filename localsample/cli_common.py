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
from typing import Annotated, Any, TextIO, TypeVar

import anyio
import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

from localsample.attach import client_runtime
from localsample.client import first_cause
from localsample.errors import LocalsampleError, ServerSpecError
from localsample.runtime import Runtime
from localsample.settings import Settings, load_settings

T = TypeVar("T")

INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT), as shells report it."""

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
"""The `--json` flag, the same for every command that has one."""

# What every HTTP listener (`serve --listen`, `daemon --listen`) is guarded by (listen.py).
TokenOption = Annotated[
    str | None,
    typer.Option(
        envvar="LOCALSAMPLE_TOKEN",
        help="Bearer token HTTP clients must send with --listen (default: generated, printed once to stderr).",
    ),
]
AllowRemoteOption = Annotated[
    bool, typer.Option("--allow-remote", help="Allow --listen on an address other than 127.0.0.1/localhost/::1.")
]
NoDaemonOption = Annotated[
    bool,
    typer.Option("--no-daemon", help="Generate in this process even when a localsample daemon runs (daemon = never)."),
]
OfflineOption = Annotated[
    bool,
    typer.Option("--offline", help="Use only loopback endpoints of remote catalog entries (offline = true)."),
]
AllowHostOption = Annotated[
    list[str] | None,
    typer.Option("--allow-host", help="Another NAME[:PORT] clients may use in Host/Origin (repeatable)."),
]


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


class Command(TyperCommand):
    """A command whose usage line names arguments the usual way (``sample [OPTIONS] PROMPT``;
    Typer's own writes ``{prompt}``)."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                name = (param.metavar or (param.name or "").upper()) + ("..." if param.nargs != 1 else "")
                pieces.append(name if param.required else f"[{name}]")
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces


class App(typer.Typer):
    """A Typer app whose commands are :class:`Command` unless they say otherwise."""

    def command(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("cls", Command)
        return super().command(*args, **kwargs)


def command_group(**kwargs: Any) -> typer.Typer:
    """A Typer app (or sub-app) whose errors go through :class:`ErrorBoundary`. Help is
    plain text: Typer's rich help labels flags such as ``--help`` with ``<bool>``, as if
    they took a value."""
    kwargs.setdefault("no_args_is_help", True)
    return App(cls=ErrorBoundary, rich_markup_mode=None, **kwargs)


open_lines: set[TextIO] = set()
"""Streams that streamed text left in the middle of a line."""


def stream_text(out: TextIO, text: str) -> None:
    """Write generated text as it comes (flushed), remembering an unfinished line."""
    if not text:
        return
    out.write(text)
    out.flush()
    if text.endswith("\n"):
        open_lines.discard(out)
    else:
        open_lines.add(out)


def end_line(out: TextIO) -> None:
    """End the line streamed text left open on ``out`` (nothing if there is none)."""
    if out in open_lines:
        open_lines.discard(out)
        out.write("\n")
        out.flush()


class LineAwareHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A log handler that first ends a line streamed text left open on a terminal, so a
    log line never starts in the middle of generated text."""

    def emit(self, record: logging.LogRecord) -> None:
        for out in list(open_lines):
            if out.isatty():
                end_line(out)
        super().emit(record)


def setup_logging(level: str = "info") -> None:
    """Every log line goes to stderr: stdout belongs to results (and to MCP in `serve`)."""
    handler = LineAwareHandler(sys.stderr)
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


def make_runtime(offline: bool = False) -> Runtime:
    """Settings, catalog and model pool for one command, with logging set up."""
    settings = settings_with_logging()
    return Runtime(settings.model_copy(update={"offline": True}) if offline else settings)


def make_client_runtime(command: str, no_daemon: bool, server: str | None = None, offline: bool = False) -> Runtime:
    """The runtime of a command that generates (serve, call, sample, run): attached to the
    running daemon when the ``daemon`` setting (or ``--no-daemon``) allows, else in-process
    (an attached command's generation follows the daemon's own ``offline`` setting)."""
    settings = settings_with_logging()
    if no_daemon:
        settings = settings.model_copy(update={"daemon": "never"})
    if offline:
        settings = settings.model_copy(update={"offline": True})
    return client_runtime(settings, command, server)


def run_async(func: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine function on a fresh event loop; its errors, even inside exception
    groups, reach :class:`ErrorBoundary`."""
    return anyio.run(func)


def parse_env(pairs: list[str] | None) -> dict[str, str]:
    """``--env KEY=VALUE`` options as a mapping."""
    env: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ServerSpecError(f"--env {pair!r} is not KEY=VALUE", "write e.g. --env API_KEY=abc")
        env[key] = value
    return env


def parse_listen(value: str) -> tuple[str, int]:
    """``--listen HOST:PORT`` (IPv6 hosts in brackets; an empty host is 127.0.0.1)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ServerSpecError(f"--listen {value!r} is not HOST:PORT", "write e.g. --listen 127.0.0.1:8765")
    return host.strip("[]") or "127.0.0.1", int(port)


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
