"""`localsample ps` and `localsample doctor`: what is running, and whether all is well."""

from __future__ import annotations

import time
from typing import Any

import typer

from localsample.cli_common import JsonOption, output, table
from localsample.daemon_socket import daemon_status
from localsample.doctor import Check, Level, diagnose, healthy
from localsample.errors import DaemonError
from localsample.gguf_file import human_size
from localsample.reports import daemons
from localsample.settings import load_settings

PS_HEADER = ("PID", "MODEL", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL")
CLIENTS_HEADER = ("PID", "COMMAND", "SERVER", "SINCE")


def ps_rows(running: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """One table row per model loaded by a running daemon."""
    rows: list[tuple[str, ...]] = []
    for status in running:
        for model in status["models"]:
            if model["in_flight"]:
                until = f"busy ({model['in_flight']})"
            elif model["until"] is None:
                until = "forever"
            else:
                until = time.strftime("%H:%M:%S", time.localtime(model["until"]))
            rows.append(
                (
                    str(status["pid"]),
                    model["id"],
                    human_size(model["size"]),
                    model["processor"],
                    str(model["n_ctx"]),
                    until,
                )
            )
    return rows


def clients_lines(daemon: dict[str, Any]) -> list[str]:
    """The daemon's attached clients, as `ps` prints them under the models."""
    clients = daemon["clients"]
    head = f"Daemon pid {daemon['pid']} ({daemon['socket']}): {daemon['requests']} requests open, "
    head += f"{len(clients)} client{'' if len(clients) == 1 else 's'} attached" + (":" if clients else ".")
    since = [time.strftime("%H:%M:%S", time.localtime(c["since"])) for c in clients]
    rows = [(str(c["pid"]), c["command"], c["server"] or "-", s) for c, s in zip(clients, since, strict=True)]
    return ["", head, *(table(CLIENTS_HEADER, rows) if rows else [])]


def ps_command(as_json: JsonOption = False) -> None:
    """Show the models loaded by running `localsample serve` processes and the daemon, and the
    clients attached to the daemon."""
    settings = load_settings()
    running = daemons(settings.state_dir)
    try:
        daemon: dict[str, Any] | None = daemon_status(settings)
    except DaemonError:
        daemon = None
    for status in running:
        if daemon is not None and status["pid"] == daemon["pid"]:  # its live view, with clients and counters
            status.update(models=daemon["models"], clients=daemon["clients"], requests=daemon["requests"])

    def text() -> list[str]:
        rows = ps_rows(running)
        lines = (
            table(PS_HEADER, rows)
            if rows
            else ["No models loaded" + ("" if running else " (no localsample serve is running)") + "."]
        )
        return lines + (clients_lines(daemon) if daemon is not None else [])

    output(running, as_json, text)


MARKS = {Level.OK: "ok     ", Level.WARNING: "warning", Level.ERROR: "error  "}


def check_lines(check: Check) -> list[str]:
    """A check as `doctor` prints it: its level and what, then the fix unless it is ok."""
    lines = [f"{MARKS[check.level]}  {check.what}"]
    if check.fix and check.level is not Level.OK:
        lines.append(f"         fix: {check.fix}")
    return lines


def doctor_command(as_json: JsonOption = False) -> None:
    """Check this installation: llama.cpp build, GPU offload, settings, catalog, model files.

    Exits with status 1 when a check finds an error.
    """
    checks = diagnose()
    output([check.as_json() for check in checks], as_json, lambda: [line for c in checks for line in check_lines(c)])
    if not healthy(checks):
        raise typer.Exit(1)
