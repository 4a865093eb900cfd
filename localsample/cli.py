"""Command line: parse, call the library, print. No logic of its own."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Coroutine
from dataclasses import asdict
from typing import Annotated, Any, TypeVar

import anyio
import typer

from localsample import __version__
from localsample.engine import ChatMessage, Completion, GenerationRequest
from localsample.errors import LocalsampleError
from localsample.runtime import Runtime
from localsample.settings import config_file_path, load_settings, setting_sources

app = typer.Typer(
    name="localsample",
    help="Answer MCP sampling requests with local GGUF models, offline.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

T = TypeVar("T")


def setup_logging(level: str = "info") -> None:
    """Every log line goes to stderr: stdout belongs to results (and to MCP in `serve`)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("localsample: %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("localsample").setLevel(level.upper())
    for noisy in ("httpx", "mcp", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def run_async(func: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine; a LocalsampleError becomes one clear message and exit code 1."""
    try:
        return anyio.run(func)
    except LocalsampleError as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        raise fail("interrupted", 130) from None


def make_runtime() -> Runtime:
    try:
        settings = load_settings()
        setup_logging(settings.log_level)
        return Runtime(settings)
    except LocalsampleError as exc:
        raise fail(str(exc)) from None


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"localsample {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Answer MCP sampling requests with local GGUF models, offline."""


def completion_json(completion: Completion, reason: str) -> dict[str, Any]:
    data = asdict(completion)
    data["reason"] = reason
    data["decode_tokens_per_second"] = round(completion.decode_tokens_per_second, 1)
    return data


@app.command()
def sample(
    prompt: Annotated[str, typer.Argument(help="The user message.")],
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    model: Annotated[str | None, typer.Option(help="Catalog id or alias to use.")] = None,
    hint: Annotated[list[str] | None, typer.Option(help="Model hint, as an MCP server sends (repeatable).")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens to generate.")] = 256,
    temperature: Annotated[float | None, typer.Option(min=0.0, max=2.0, help="0 = greedy.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop sequence (repeatable).")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed, for repeatable sampling.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of streaming.")] = False,
) -> None:
    """Generate a reply to PROMPT locally, streaming it to stdout."""
    runtime = make_runtime()

    async def go() -> None:
        try:
            request = GenerationRequest(
                messages=[ChatMessage("user", prompt)],
                max_tokens=max_tokens,
                system=system,
                stop=tuple(stop or ()),
                temperature=temperature,
                seed=seed,
            )
            choice = runtime.select(model=model, hints=hint or ())

            async def show(text: str, _tokens: int) -> None:
                sys.stdout.write(text)
                sys.stdout.flush()

            completion = await runtime.complete(choice, request, None if as_json else show)
        finally:
            runtime.close()
        if as_json:
            typer.echo(json.dumps(completion_json(completion, choice.reason), indent=2))
        else:
            sys.stdout.write("\n")
            typer.echo(
                f"[{completion.model}: {completion.completion_tokens} tokens, {completion.stop_reason}, "
                f"{completion.decode_tokens_per_second:.0f} tok/s]",
                err=True,
            )

    run_async(go)


@app.command()
def config(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Print the effective settings and where each one came from."""
    try:
        settings = load_settings()
    except LocalsampleError as exc:
        raise fail(str(exc)) from None
    sources = setting_sources(settings)
    values = {name: str(value) for name, value in settings.model_dump().items()}
    path = config_file_path()
    if as_json:
        payload = {
            "config_file": str(path),
            "config_file_exists": path.is_file(),
            "settings": values,
            "sources": sources,
        }
        typer.echo(json.dumps(payload, indent=2))
        return
    typer.echo(f"config file: {path}{'' if path.is_file() else ' (not present)'}")
    width = max(len(name) for name in values)
    for name, value in values.items():
        typer.echo(f"  {name:<{width}}  {value}    [{sources[name]}]")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
