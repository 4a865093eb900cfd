"""Command line: parse, call the library, print. No logic of its own.

Errors are not handled here: commands raise, and the command group's error boundary
(:mod:`localsample.cli_common`) prints them.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from mcp import types
from mcp.shared.exceptions import MCPDeprecationWarning

from localsample import __version__
from localsample.approval import TerminalApprover
from localsample.cli_audit import audit_app
from localsample.cli_common import (
    AllowHostOption,
    AllowRemoteOption,
    JsonOption,
    NoDaemonOption,
    OfflineOption,
    TokenOption,
    command_group,
    end_line,
    make_client_runtime,
    output,
    parse_env,
    parse_listen,
    print_json,
    run_async,
    stream_text,
)
from localsample.cli_daemon import daemon_app
from localsample.cli_models import models_app
from localsample.cli_ops import doctor_command, ps_command
from localsample.cli_run import run_command
from localsample.client import NO_BACK_CHANNEL, ServerSpec, call_tool, tool_result_text
from localsample.errors import ServerError
from localsample.generation import MEDIA_MARKER, ChatMessage, Completion, GenerationRequest
from localsample.listen import check_bind
from localsample.media import medium_from_file
from localsample.proxy import Proxy
from localsample.runtime import Origin
from localsample.sampling import Echo, SamplingHandler
from localsample.selection import Preferences
from localsample.settings import config_file_path, load_settings, setting_sources

app = command_group(
    name="localsample",
    help="Answer MCP sampling requests with local GGUF models, offline.",
    pretty_exceptions_enable=False,
    add_completion=False,
)


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
    image: Annotated[
        list[Path] | None, typer.Option(help="An image (PNG, JPEG, WebP, GIF) before the prompt (repeatable).")
    ] = None,
    audio: Annotated[list[Path] | None, typer.Option(help="A WAV or MP3 clip before the prompt (repeatable).")] = None,
    as_json: JsonOption = False,
    no_daemon: NoDaemonOption = False,
    offline: OfflineOption = False,
) -> None:
    """Generate a reply to PROMPT locally, streaming it to stdout (with --json: one JSON object at the end)."""
    media = tuple(medium_from_file(path) for path in [*(image or ()), *(audio or ())])
    runtime = make_client_runtime("sample", no_daemon, offline=offline)

    async def go() -> None:
        try:
            request = GenerationRequest(
                messages=[ChatMessage("user", MEDIA_MARKER * len(media) + prompt, media=media)],
                max_tokens=max_tokens,
                system=system,
                stop=tuple(stop or ()),
                temperature=temperature,
                seed=seed,
            )

            async def show(text: str, _tokens: int) -> None:
                stream_text(sys.stdout, text)

            answer = await runtime.answer(
                request,
                Origin(server="sample", request_id="sample"),
                prefs=Preferences(hints=tuple(hint or ())),
                model=model,
                ask=TerminalApprover(),
                on_text=None if as_json else show,
            )
            completion, reason = answer.completion, answer.reason
        finally:
            await runtime.aclose()
        if as_json:
            print_json(completion_json(completion, reason))
        else:
            end_line(sys.stdout)
            typer.echo(
                f"[{completion.model}: {completion.completion_tokens} tokens, {completion.stop_reason}, "
                f"{completion.decode_tokens_per_second:.0f} tok/s]",
                err=True,
            )

    run_async(go)


def terminal_echo(quiet: bool) -> Echo | None:
    """Live tokens on stderr when it is a terminal (stdout carries the result)."""
    if quiet or not sys.stderr.isatty():
        return None

    def echo(text: str) -> None:
        stream_text(sys.stderr, text)

    return echo


ServerOption = Annotated[str, typer.Option("--server", "-s", help="[NAME=]COMMAND or http(s)://URL of the MCP server.")]
EnvOption = Annotated[list[str] | None, typer.Option("--env", help="KEY=VALUE for a stdio server (repeatable).")]
CwdOption = Annotated[Path | None, typer.Option("--cwd", help="Working directory for a stdio server.")]
ProtocolOption = Annotated[
    str,
    typer.Option(
        "--protocol",
        help="auto (2026-07-28 if the server offers it), legacy (initialize handshake), or 2026-07-28.",
    ),
]


@app.command()
def call(
    tool: Annotated[str, typer.Argument(help="Name of the tool to call.")],
    server: ServerOption,
    arg: Annotated[list[str] | None, typer.Option("--arg", "-a", help="key=value argument (repeatable).")] = None,
    args_json: Annotated[str | None, typer.Option("--args", help="Arguments as a JSON object.")] = None,
    env: EnvOption = None,
    cwd: CwdOption = None,
    protocol: ProtocolOption = "auto",
    as_json: JsonOption = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Do not show tokens live on stderr.")] = False,
    no_daemon: NoDaemonOption = False,
    offline: OfflineOption = False,
) -> None:
    """Call one TOOL of an MCP server, answering its sampling requests locally.

    Prints the tool's text, or with --json the whole tool result.
    """
    spec = ServerSpec.parse(server, env=parse_env(env), cwd=cwd, protocol=protocol)
    runtime = make_client_runtime(f"call {tool}", no_daemon, spec.name, offline)
    echo = None if as_json else terminal_echo(quiet)
    handler = SamplingHandler(runtime, server=spec.name, echo=echo, ask=TerminalApprover())

    async def go() -> types.CallToolResult:
        try:
            return await call_tool(
                spec,
                tool,
                handler,
                pairs=arg,
                json_args=args_json,
                connect_timeout=runtime.settings.connect_timeout,
            )
        finally:
            await runtime.aclose()

    result = run_async(go)
    if echo is not None:
        end_line(sys.stderr)
    if as_json:
        typer.echo(result.model_dump_json(by_alias=True, exclude_none=True, indent=2))
    elif not result.is_error:
        typer.echo(tool_result_text(result))
    if result.is_error:
        text = tool_result_text(result)
        fix = None
        if NO_BACK_CHANNEL in text:
            fix = "this server pushes sampling requests; run again with --protocol legacy"
        raise ServerError(f"tool '{tool}' failed: {text}", fix)


@app.command()
def serve(
    server: Annotated[list[str], typer.Option("--server", "-s", help="[NAME=]COMMAND or http(s)://URL (repeatable).")],
    env: EnvOption = None,
    cwd: CwdOption = None,
    protocol: ProtocolOption = "auto",
    listen: Annotated[
        str | None, typer.Option(help="Serve over Streamable HTTP at HOST:PORT instead of stdio.")
    ] = None,
    allow_remote: AllowRemoteOption = False,
    token: TokenOption = None,
    allow_host: AllowHostOption = None,
    no_daemon: NoDaemonOption = False,
    offline: OfflineOption = False,
) -> None:
    """Serve MCP to a host, forwarding to SERVER(s) and answering their sampling locally.

    Put this in place of the server's own command in the host's MCP configuration.
    stdout carries the protocol; every log line goes to stderr.
    """
    specs = [ServerSpec.parse(value, env=parse_env(env), cwd=cwd, protocol=protocol) for value in server]
    names = ",".join(spec.name for spec in specs)
    runtime = make_client_runtime("serve", no_daemon, names, offline)
    proxy = Proxy(runtime, specs)
    address = parse_listen(listen) if listen else None
    if address is not None:
        check_bind(address[0], allow_remote)  # before any server starts or model loads

    async def go() -> None:
        try:
            if address is None:
                await proxy.run_stdio()
            else:
                host, port = address
                await proxy.run_http(
                    host, port, token=token, allow_remote=allow_remote, extra_hosts=tuple(allow_host or ())
                )
        finally:
            await runtime.aclose()

    run_async(go)
    if proxy.exit_status:  # stopped by SIGINT
        raise typer.Exit(proxy.exit_status)


@app.command()
def config(as_json: JsonOption = False) -> None:
    """Print the effective settings and where each one came from."""
    settings = load_settings()
    sources = setting_sources(settings)
    values = {name: str(value) for name, value in settings.model_dump().items()}
    path = config_file_path()
    payload = {"config_file": str(path), "config_file_exists": path.is_file(), "settings": values, "sources": sources}

    def text() -> list[str]:
        width = max(len(name) for name in values)
        lines = [f"config file: {path}{'' if path.is_file() else ' (not present)'}"]
        return lines + [f"  {name:<{width}}  {value}    [{sources[name]}]" for name, value in values.items()]

    output(payload, as_json, text)


# After the commands above, so that help lists them first.
app.add_typer(models_app, name="models")
app.add_typer(audit_app, name="audit")
app.add_typer(daemon_app, name="daemon")
app.command("run")(run_command)
app.command("ps")(ps_command)
app.command("doctor")(doctor_command)


def main() -> None:
    """The `localsample` program (errors are handled by the command group, see cli_common)."""
    # Sampling is deprecated in the 2026-07-28 spec but kept for 12 months; answering it
    # is this tool's purpose, so the SDK's deprecation warnings are noise here.
    warnings.filterwarnings("ignore", category=MCPDeprecationWarning)
    app()


if __name__ == "__main__":
    main()
