"""`localsample models ...`: the catalog and the models on disk."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from localsample.errors import LocalsampleError
from localsample.selection import CAPABILITIES, Needs, Preferences

models_app = typer.Typer(help="Manage and inspect the model catalog.", no_args_is_help=True)


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


@models_app.command("select")
def select_command(
    hint: Annotated[list[str] | None, typer.Option(help="Model hint, in order (repeatable).")] = None,
    cost: Annotated[float | None, typer.Option(help="costPriority, 0..1.")] = None,
    speed: Annotated[float | None, typer.Option(help="speedPriority, 0..1.")] = None,
    intelligence: Annotated[float | None, typer.Option(help="intelligencePriority, 0..1.")] = None,
    needs: Annotated[list[str] | None, typer.Option(help="vision, tools or audio (repeatable).")] = None,
    context: Annotated[int, typer.Option(help="Tokens of context the request needs.")] = 0,
    server: Annotated[str, typer.Option(help="Server name, for its settings (pin, allow-list).")] = "server",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show which model a request with these preferences gets, why, and the runners-up."""
    from localsample.cli import make_runtime

    unknown = sorted(set(needs or ()) - set(CAPABILITIES))
    if unknown:
        raise _fail(f"--needs {', '.join(unknown)}: use {', '.join(CAPABILITIES)}")
    runtime = make_runtime()
    try:
        prefs = Preferences(tuple(hint or ()), cost, speed, intelligence)
        choice = runtime.select(needs=Needs(frozenset(needs or ()), max_tokens=context), prefs=prefs, server=server)
    except LocalsampleError as exc:
        raise _fail(str(exc)) from None
    ranking = [{"id": r.model.id, "score": round(r.score, 3), "excluded": r.excluded} for r in choice.ranking]
    if as_json:
        typer.echo(json.dumps({"model": choice.model.id, "reason": choice.reason, "ranking": ranking}, indent=2))
        return
    typer.echo(choice.model.id)
    typer.echo(f"  why: {choice.reason}")
    typer.echo("  ranking (score: the request's priorities applied to the catalog's cost/speed/intelligence):")
    width = max(len(r.model.id) for r in choice.ranking)
    for r in choice.ranking:
        mark = "*" if r.model.id == choice.model.id else " "
        note = f"  - {r.excluded}" if r.excluded else ""
        typer.echo(f"  {mark} {r.model.id:<{width}}  {r.score:.2f}{note}")
