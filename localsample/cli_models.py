"""`localsample models ...`: the catalog and the models on disk."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from localsample import manage
from localsample.catalog import ModelEntry
from localsample.cli_common import JsonOption, command_group, make_runtime, output, table
from localsample.errors import LocalsampleError, RequestError
from localsample.gguf_file import human_count, human_size
from localsample.reports import ModelReport, model_report
from localsample.selection import CAPABILITIES, Needs, Preferences

models_app = command_group(help="Manage and inspect the model catalog.")


@models_app.command("select")
def select_command(
    hint: Annotated[list[str] | None, typer.Option(help="Model hint, in order (repeatable).")] = None,
    cost: Annotated[float | None, typer.Option(help="costPriority, 0..1.")] = None,
    speed: Annotated[float | None, typer.Option(help="speedPriority, 0..1.")] = None,
    intelligence: Annotated[float | None, typer.Option(help="intelligencePriority, 0..1.")] = None,
    needs: Annotated[list[str] | None, typer.Option(help="vision, tools or audio (repeatable).")] = None,
    context: Annotated[int, typer.Option(help="Tokens of context the request needs.")] = 0,
    server: Annotated[str, typer.Option(help="Server name, for its settings (pin, allow-list).")] = "server",
    as_json: JsonOption = False,
) -> None:
    """Show which model a request with these preferences gets, why, and the runners-up."""
    unknown = sorted(set(needs or ()) - set(CAPABILITIES))
    if unknown:
        raise RequestError(f"--needs {', '.join(unknown)}: use {', '.join(CAPABILITIES)}")
    runtime = make_runtime()
    prefs = Preferences(tuple(hint or ()), cost, speed, intelligence)
    choice = runtime.select(needs=Needs(frozenset(needs or ()), max_tokens=context), prefs=prefs, server=server)
    ranking = [
        {"id": r.model.id, "score": round(r.score, 3) if any(prefs.weights) else None, "excluded": r.excluded}
        for r in choice.ranking
    ]

    scored = any(prefs.weights)

    def text() -> list[str]:
        header = (
            "  ranking (score: the request's priorities applied to the catalog's cost/speed/intelligence):"
            if scored
            else "  ranking (no priorities given, so no scores: --cost, --speed, --intelligence set them):"
        )
        lines = [choice.model.id, f"  why: {choice.reason}", header]
        width = max(len(r.model.id) for r in choice.ranking)
        for r in choice.ranking:
            mark = "*" if r.model.id == choice.model.id else " "
            note = f"  - {r.excluded}" if r.excluded else ""
            lines.append(f"  {mark} {r.model.id:<{width}}  {f'{r.score:.2f}' if scored else '—':>4}{note}")
        return lines

    output({"model": choice.model.id, "reason": choice.reason, "ranking": ranking}, as_json, text)


def _say(text: str) -> None:
    typer.echo(text, err=True)


@models_app.command("pull")
def pull_command(
    ref: Annotated[str, typer.Argument(help="Catalog id, hf://ORG/REPO/FILE.gguf, or ORG/REPO[:QUANT].")],
    model_id: Annotated[str | None, typer.Option("--id", help="Catalog id for a new model.")] = None,
    revision: Annotated[str | None, typer.Option(help="Branch, tag or commit (default: main).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Download a GGUF model from the Hugging Face hub and add it to your catalog (no progress bar with --json)."""
    runtime = make_runtime()
    progress = sys.stderr.isatty() and not as_json
    done = manage.pull(runtime, ref, new_id=model_id, progress=progress, say=_say, revision=revision)
    size = sum(p.stat().st_size for p in done.paths)
    data = {"id": done.model_id, "files": [str(p) for p in done.paths], "size": size, "catalog": done.registered}
    where = {"added": "added to your catalog", "updated": "updated in your catalog", "listed": "in the catalog"}
    output(data, as_json, lambda: [f"{done.model_id}: {human_size(size)} ready ({where[done.registered]})"])


@models_app.command("list")
def list_command(as_json: JsonOption = False) -> None:
    """List the catalog's models and whether each is downloaded."""
    found = manage.rows(make_runtime())

    def text() -> list[str]:
        if not found:
            return ["No models in the catalog. Add one with `localsample models pull ORG/REPO`."]
        lines = table(("ID", "ALIASES", "SIZE", "QUANT", "STATUS"), [list_row(row) for row in found])
        return lines + [f"{row.id}: {e['url']} {e['state']}" for row in found for e in row.endpoints or ()]

    output([row.as_json() for row in found], as_json, text)


def list_row(row: manage.Row) -> tuple[str, ...]:
    """One line of `models list`, as table cells."""
    size = human_size(row.size) if row.size is not None else "-"
    return (row.id, ",".join(row.aliases) or "-", size, row.quant, row.status)


@models_app.command("show")
def show_command(
    model: Annotated[str, typer.Argument(help="Catalog id or alias.")],
    as_json: JsonOption = False,
) -> None:
    """Show a model: what its GGUF header says, where it is, its catalog settings."""
    runtime = make_runtime()
    report = model_report(runtime, model)
    if report.entry.remote:
        remote = remote_fields(report.entry, manage.endpoint_states(runtime, report.entry))
        data = report.as_json() | {"status": "remote", "path": None, **remote}
        output(data, as_json, lambda: remote_lines(report.entry, remote))
        return
    output(report.as_json(), as_json, lambda: show_lines(report))


def remote_fields(entry: ModelEntry, endpoints: list[dict[str, Any]]) -> dict[str, Any]:
    """What `models show` adds for a remote model (the key's variable, never the key)."""
    return {
        "endpoints": endpoints,
        "remote_model": entry.remote_model or entry.id,
        "api_key_env": entry.api_key_env,
        "timeout": entry.timeout,
        "max_concurrency": entry.max_concurrency,
    }


def remote_lines(entry: ModelEntry, remote: dict[str, Any]) -> list[str]:
    """`models show` as text, for a remote model."""
    key = remote["api_key_env"] or "none (no api_key_env)"
    concurrency = remote["max_concurrency"] or "the parallel setting"
    return [
        entry.id + (f" - {entry.description}" if entry.description else ""),
        *(f"  endpoint      {e['url']} {e['state']}" for e in remote["endpoints"]),
        f"  remote model  {remote['remote_model']}",
        f"  key from      {key}",
        f"  capabilities  {', '.join(entry.capabilities)}; n_ctx {entry.load.n_ctx}",
        f"  limits        timeout {entry.timeout:g} s, max_concurrency {concurrency} per endpoint",
        f"  scores        cost {entry.cost}, speed {entry.speed}, intelligence {entry.intelligence}",
    ]


def show_lines(report: ModelReport) -> list[str]:
    """`models show` as text."""
    entry, info, files = report.entry, report.info, report.files
    lines = [entry.id + (f" - {entry.description}" if entry.description else "")]
    if info is None:
        lines.append(f"  status        missing: localsample models pull {entry.id}")
    else:
        template = info.template_family or ("none (catalog sets chat_template)" if entry.chat_template else "none")
        lines += [
            f"  architecture  {info.architecture}",
            f"  parameters    {human_count(info.parameters)}",
            f"  quantization  {info.quantization}",
            f"  context       {info.context_length or 'unknown'} trained, n_ctx {entry.load.n_ctx} loaded",
            f"  chat template {template}",
            f"  projector     {report.vision_projector or 'none'}"
            + (f" (reads {'/'.join(report.projector_reads)})" if report.projector_reads else ""),
            f"  path          {files[0]}" + (f" (+{len(files) - 1} more)" if len(files) > 1 else ""),
            f"  size          {human_size(report.size or 0)}",
        ]
    load = ", ".join(f"{k}={v}" for k, v in entry.load.model_dump(exclude_none=True).items())
    return [
        *lines,
        f"  source        {entry.source}",
        f"  scores        cost {entry.cost}, speed {entry.speed}, intelligence {entry.intelligence}",
        f"  load          {load}",
    ]


@models_app.command("rm")
def rm_command(
    models: Annotated[list[str], typer.Argument(help="Catalog ids or aliases.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
) -> None:
    """Delete models' files (and their entries in your catalog)."""
    runtime = make_runtime()
    sizes = [manage.removal_size(runtime, name) for name in models]
    if not yes:
        if not sys.stdin.isatty():
            raise LocalsampleError("models rm asks before deleting", "pass --yes to run without a terminal")
        listed = ", ".join(f"{m.id} ({human_size(size)})" for m, size in sizes)
        if not typer.confirm(f"Delete {listed}?", default=False, err=True):
            raise typer.Exit(1)
    for model, _ in sizes:
        done = manage.remove(runtime, model.id)
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
    runtime = make_runtime()
    new_id, updated = manage.import_model(runtime, path, new_id=model_id, copy=copy, mmproj=mmproj)
    typer.echo(f"{new_id}: {'updated in' if updated else 'added to'} your catalog ({runtime.settings.catalog_path})")
