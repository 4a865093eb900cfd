"""`localsample audit ...`: read the audit trail."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from localsample.audit import AuditLog
from localsample.cli_common import JsonOption, command_group, output
from localsample.settings import load_settings

audit_app = command_group(help="Read the audit trail of sampling requests.")


def audit_log() -> AuditLog:
    """The audit trail the settings name."""
    return AuditLog.from_settings(load_settings())


@audit_app.command("tail")
def tail_command(
    lines: Annotated[int, typer.Option("-n", "--lines", min=1, help="How many entries.")] = 20,
    as_json: JsonOption = False,
) -> None:
    """Show the most recent sampling requests (with --json: their JSON lines as they are)."""
    log = audit_log()
    records = log.tail(lines)
    if as_json:
        for record in records:
            typer.echo(json.dumps(record))
        return
    if not records:
        typer.echo(f"No sampling requests recorded yet ({log.path}).")
        return
    for r in records:
        counted = r.get("prompt_tokens") is not None
        tokens = f"{r['prompt_tokens']}+{r.get('completion_tokens') or 0} tok" if counted else "-"
        took = f"{r['duration']:.2f}s" if r.get("duration") is not None else "-"
        outcome = r.get("decision", "?") + (f" by {r['by']}" if r.get("by") else "")
        line = f"{r.get('time', '?')[:19]}  {r.get('server')}  {r.get('model') or '-'}  {outcome}  {tokens}  {took}"
        if r.get("tool"):
            line += f"  tool {r['tool']}" + (" (error)" if r.get("is_error") else "")
        if r.get("stop_reason"):
            line += f"  {r['stop_reason']}"
        if r.get("error"):
            line += f"  error: {r['error']}"
        typer.echo(line)


@audit_app.command("stats")
def stats_command(as_json: JsonOption = False) -> None:
    """Per-server counts: requests, decisions, tokens, time, models."""
    log = audit_log()
    stats = log.stats()

    def text() -> list[str]:
        if not stats:
            return [f"No sampling requests recorded yet ({log.path})."]
        lines = []
        for server, s in sorted(stats.items()):
            decisions = ", ".join(f"{k} {v}" for k, v in sorted(s["decisions"].items()))
            models = ", ".join(f"{k} {v}" for k, v in sorted(s["models"].items())) or "-"
            lines.append(
                f"{server}: {s['requests']} requests ({decisions}); {s['prompt_tokens']} prompt + "
                f"{s['completion_tokens']} generated tokens; {s['seconds']:.1f}s; models: {models}"
                + (f"; {s['tool_calls']} tool calls by `run`" if s["tool_calls"] else "")
            )
        return lines

    output(stats, as_json, text)
