"""`localsample models ...`: the catalog and the models on disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from localsample.errors import LocalsampleError
from localsample.gguf_file import human_count, human_size
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


def _say(text: str) -> None:
    typer.echo(text, err=True)


@models_app.command("pull")
def pull_command(
    ref: Annotated[str, typer.Argument(help="Catalog id, hf://ORG/REPO/FILE.gguf, or ORG/REPO[:QUANT].")],
    model_id: Annotated[str | None, typer.Option("--id", help="Catalog id for a new model.")] = None,
    revision: Annotated[str | None, typer.Option(help="Branch, tag or commit (default: main).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON; no progress bar.")] = False,
) -> None:
    """Download a GGUF model from the Hugging Face hub and add it to your catalog."""
    import sys

    from localsample.cli import make_runtime
    from localsample.manage import pull

    runtime = make_runtime()
    try:
        progress = sys.stderr.isatty() and not as_json
        done = pull(runtime, ref, new_id=model_id, progress=progress, say=_say, revision=revision)
    except LocalsampleError as exc:
        raise _fail(str(exc)) from None
    size = sum(p.stat().st_size for p in done.paths)
    if as_json:
        data = {"id": done.model_id, "files": [str(p) for p in done.paths], "size": size, "catalog": done.registered}
        typer.echo(json.dumps(data, indent=2))
        return
    where = {"added": "added to your catalog", "updated": "updated in your catalog", "listed": "in the catalog"}
    typer.echo(f"{done.model_id}: {human_size(size)} ready ({where[done.registered]})")


@models_app.command("list")
def list_command(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List the catalog's models and whether each is downloaded."""
    from localsample.cli import make_runtime
    from localsample.manage import rows

    found = rows(make_runtime())
    if as_json:
        typer.echo(json.dumps([row.as_json() for row in found], indent=2))
        return
    if not found:
        typer.echo("No models in the catalog. Add one with `localsample models pull ORG/REPO`.")
        return
    table = [("ID", "ALIASES", "SIZE", "QUANT", "STATUS")]
    for row in found:
        size = human_size(row.size) if row.size is not None else "-"
        status = "downloaded" if row.downloaded else "missing"
        table.append((row.id, ",".join(row.aliases) or "-", size, row.quant, status))
    widths = [max(len(line[i]) for line in table) for i in range(5)]
    for line in table:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())


@models_app.command("show")
def show_command(
    model: Annotated[str, typer.Argument(help="Catalog id or alias.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show a model: what its GGUF header says, where it is, its catalog settings."""
    from localsample.cli import make_runtime
    from localsample.manage import details

    runtime = make_runtime()
    try:
        entry, info, files = details(runtime, model)
    except LocalsampleError as exc:
        raise _fail(str(exc)) from None
    data: dict[str, object] = {
        "id": entry.id,
        "status": "downloaded" if files else "missing",
        "source": entry.source,
        "path": str(files[0]) if files else None,
        "size": sum(f.stat().st_size for f in files) if files else None,
        "aliases": entry.aliases,
        "capabilities": entry.capabilities,
        "scores": {"cost": entry.cost, "speed": entry.speed, "intelligence": entry.intelligence},
        "load": entry.load.model_dump(exclude_none=True),
    }
    if info is not None:
        data |= {
            "architecture": info.architecture,
            "parameters": info.parameters,
            "quantization": info.quantization,
            "context_length": info.context_length,
            "chat_template": info.template_family if info.chat_template else None,
            "chat_template_override": entry.chat_template is not None,
            "split_parts": info.split_count,
            "vision_projector": str(files[-1]) if entry.mmproj and len(files) > info.split_count else None,
        }
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    typer.echo(entry.id + (f" - {entry.description}" if entry.description else ""))
    if info is None:
        typer.echo(f"  status        missing: localsample models pull {entry.id}")
    else:
        template = info.template_family or ("none (catalog sets chat_template)" if entry.chat_template else "none")
        typer.echo(f"  architecture  {info.architecture}")
        typer.echo(f"  parameters    {human_count(info.parameters)}")
        typer.echo(f"  quantization  {info.quantization}")
        typer.echo(f"  context       {info.context_length or 'unknown'} trained, n_ctx {entry.load.n_ctx} loaded")
        typer.echo(f"  chat template {template}")
        typer.echo(f"  vision        {data['vision_projector'] or 'no projector'}")
        typer.echo(f"  path          {files[0]}" + (f" (+{len(files) - 1} more)" if len(files) > 1 else ""))
        typer.echo(f"  size          {human_size(sum(f.stat().st_size for f in files))}")
    typer.echo(f"  source        {entry.source}")
    typer.echo(f"  scores        cost {entry.cost}, speed {entry.speed}, intelligence {entry.intelligence}")
    load = ", ".join(f"{k}={v}" for k, v in entry.load.model_dump(exclude_none=True).items())
    typer.echo(f"  load          {load}")


@models_app.command("rm")
def rm_command(
    models: Annotated[list[str], typer.Argument(help="Catalog ids or aliases.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
) -> None:
    """Delete models' files (and their entries in your catalog)."""
    import sys

    from localsample.cli import make_runtime
    from localsample.manage import removal_size, remove

    runtime = make_runtime()
    try:
        sizes = [removal_size(runtime, name) for name in models]
    except LocalsampleError as exc:
        raise _fail(str(exc)) from None
    if not yes:
        if not sys.stdin.isatty():
            raise _fail("models rm asks before deleting; pass --yes to run without a terminal")
        listed = ", ".join(f"{m.id} ({human_size(size)})" for m, size in sizes)
        if not typer.confirm(f"Delete {listed}?", default=False, err=True):
            raise typer.Exit(1)
    for model, _ in sizes:
        done = remove(runtime, model.id)
        note = "" if done.entry_removed else " (the packaged catalog still lists it)"
        kept = f"; left in place: {', '.join(map(str, done.kept))}" if done.kept else ""
        typer.echo(f"removed {done.model_id}: freed {human_size(done.freed)}{note}{kept}")


@models_app.command("import")
def import_command(
    path: Annotated[Path, typer.Argument(help="A local .gguf file.")],
    model_id: Annotated[str | None, typer.Option("--id", help="Catalog id (default: from the file name).")] = None,
    copy: Annotated[bool, typer.Option("--copy", help="Copy it into the model store.")] = False,
    mmproj: Annotated[Path | None, typer.Option(help="Its vision projector (mmproj GGUF).")] = None,
) -> None:
    """Register a local GGUF in your catalog (its header is checked; no copy unless --copy)."""
    from localsample.cli import make_runtime
    from localsample.manage import import_model

    runtime = make_runtime()
    try:
        new_id, updated = import_model(runtime, path, new_id=model_id, copy=copy, mmproj=mmproj)
    except LocalsampleError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"{new_id}: {'updated in' if updated else 'added to'} your catalog ({runtime.settings.catalog_path})")
