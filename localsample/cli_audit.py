"""`localsample audit ...`: read the audit trail."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from localsample.audit import AuditLog
from localsample.errors import LocalsampleError
from localsample.settings import load_settings

audit_app = typer.Typer(help="Read the audit trail of sampling requests.", no_args_is_help=True)


def _log() -> AuditLog:
    try:
        settings = load_settings()
    except LocalsampleError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    return AuditLog.from_settings(settings)


@audit_app.command("tail")
def tail_command(
    lines: Annotated[int, typer.Option("-n", "--lines", min=1, help="How many entries.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON lines as they are.")] = False,
) -> None:
    """Show the most recent sampling requests."""
    log = _log()
    records = log.tail(lines)
    if as_json:
        for record in records:
            typer.echo(json.dumps(record))
        return
    if not records:
        typer.echo(f"No sampling requests recorded yet ({log.path}).")
        return
    for r in records:
        tokens = f"{r.get('prompt_tokens', '-')}+{r.get('completion_tokens', '-')} tok"
        took = f"{r['duration']:.2f}s" if r.get("duration") is not None else "-"
        outcome = r.get("decision", "?") + (f" by {r['by']}" if r.get("by") else "")
        line = f"{r.get('time', '?')[:19]}  {r.get('server')}  {r.get('model') or '-'}  {outcome}  {tokens}  {took}"
        if r.get("stop_reason"):
            line += f"  {r['stop_reason']}"
        if r.get("error"):
            line += f"  error: {r['error']}"
        typer.echo(line)


@audit_app.command("stats")
def stats_command(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Per-server counts: requests, decisions, tokens, time, models."""
    log = _log()
    stats = log.stats()
    if as_json:
        typer.echo(json.dumps(stats, indent=2))
        return
    if not stats:
        typer.echo(f"No sampling requests recorded yet ({log.path}).")
        return
    for server, s in sorted(stats.items()):
        decisions = ", ".join(f"{k} {v}" for k, v in sorted(s["decisions"].items()))
        models = ", ".join(f"{k} {v}" for k, v in sorted(s["models"].items())) or "-"
        typer.echo(
            f"{server}: {s['requests']} requests ({decisions}); {s['prompt_tokens']} prompt + "
            f"{s['completion_tokens']} generated tokens; {s['seconds']:.1f}s; models: {models}"
        )
