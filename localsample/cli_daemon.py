"""`localsample daemon` (run the daemon in the foreground) and `localsample daemon stop`.

The daemon itself lives in daemon.py; this module only parses options, calls it and
prints. Errors go through the command group's error boundary (cli_common).
"""

from __future__ import annotations

from typing import Annotated

import typer

from localsample.cli_common import (
    AllowHostOption,
    AllowRemoteOption,
    OfflineOption,
    TokenOption,
    command_group,
    make_runtime,
    parse_listen,
    run_async,
    settings_with_logging,
)
from localsample.daemon_socket import stop_daemon
from localsample.errors import ServerSpecError
from localsample.listen import check_bind

daemon_app = command_group(
    name="daemon",
    invoke_without_command=True,
    no_args_is_help=False,
)


@daemon_app.callback()
def daemon(
    ctx: typer.Context,
    listen: Annotated[
        str | None,
        typer.Option(help="Also serve the API over HTTP at HOST:PORT (bearer token required)."),
    ] = None,
    token: TokenOption = None,
    allow_remote: AllowRemoteOption = False,
    allow_host: AllowHostOption = None,
    offline: OfflineOption = False,
    idle_exit: Annotated[
        float | None,
        typer.Option(help="Exit after this many minutes without attached clients (daemon = spawn uses it).", min=0.01),
    ] = None,
) -> None:
    """Run one resident process that owns the models, with a local OpenAI-compatible API.

    Runs in the foreground until Ctrl-C, SIGTERM or `localsample daemon stop`, serving
    GET /v1/models and POST /v1/chat/completions on a Unix socket in the state directory
    (mode 0600: no token), and with --listen over HTTP too. Log lines go to stderr.
    """
    if ctx.invoked_subcommand is not None:
        return
    from localsample.daemon import Daemon, Listen  # the server side: only the daemon imports it

    options = None
    if listen is not None:
        host, port = parse_listen(listen)
        check_bind(host, allow_remote)  # before any model loads
        options = Listen(host, port, token, allow_remote, tuple(allow_host or ()))
    elif allow_remote or allow_host:
        raise ServerSpecError("--allow-remote and --allow-host apply only with --listen", "add --listen HOST:PORT")
    run_async(Daemon(make_runtime(offline), options, idle_exit).run)


@daemon_app.command()
def stop() -> None:
    """Ask the running daemon to exit, and wait until it has (exit status 1 if none runs)."""
    pid = stop_daemon(settings_with_logging())
    typer.echo(f"stopped the localsample daemon (pid {pid})")
