"""`localsample call` and `serve --listen` as real processes, against real MCP servers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from localsample.client import ServerSpec, check_tool_args, first_cause, parse_tool_args
from localsample.errors import ServerError, ServerSpecError

ROOT = Path(__file__).resolve().parent.parent
SERVER = f"{sys.executable} {ROOT / 'tests' / 'servers' / 'sampling_server.py'}"


def localsample(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "localsample", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def test_readme_demo_writes_a_description_with_the_local_model(model_dir: Path) -> None:
    proc = localsample(
        "call",
        "--server",
        f"{sys.executable} examples/product_server.py",
        "create_product",
        "--arg",
        "name=tomato",
        "--arg",
        "keywords=red, fresh",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Tomato\n")
    assert "(description written by smollm2-135m-instruct)" in proc.stdout
    assert len(proc.stdout) > 60  # a real description, not just the frame


def test_call_json_prints_the_whole_result_and_types_arguments(model_dir: Path) -> None:
    proc = localsample("call", "--server", SERVER, "echo", "--arg", "text=7", "--arg", "times=3", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["content"][0]["text"] == "777"  # text stayed a string, times became an int


def test_call_answers_sampling_on_a_legacy_connection(model_dir: Path) -> None:
    proc = localsample("call", "--server", SERVER, "push", "--args", '{"max_tokens": 5}', "--protocol", "legacy")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["result"]["model"] == "smollm2-135m-instruct"


def test_a_push_server_on_the_new_era_gets_a_hint_to_use_legacy(model_dir: Path) -> None:
    proc = localsample("call", "--server", SERVER, "classic")
    assert proc.returncode == 1
    assert "no back-channel" in proc.stderr and "run again with --protocol legacy" in proc.stderr
    fixed = localsample("call", "--server", SERVER, "classic", "--protocol", "legacy")
    assert fixed.returncode == 0, fixed.stderr
    assert fixed.stdout.startswith("smollm2-135m-instruct: ")


def test_unknown_tool_lists_the_tools(model_dir: Path) -> None:
    proc = localsample("call", "--server", SERVER, "nope")
    assert proc.returncode == 1
    assert "no tool 'nope'" in proc.stderr and "echo" in proc.stderr and "write" in proc.stderr


def test_a_misspelt_or_missing_argument_is_refused_before_the_call(model_dir: Path) -> None:
    proc = localsample("call", "--server", SERVER, "echo", "--arg", "nme=x")
    assert proc.returncode == 1
    assert "no argument 'nme'" in proc.stderr and "missing required 'text'" in proc.stderr
    assert "text (required), times" in proc.stderr and "fix:" in proc.stderr


def test_arguments_are_checked_against_the_schema() -> None:
    schema = {"type": "object", "properties": {"name": {}, "count": {}}, "required": ["name"]}
    check_tool_args("t", {"name": "x", "count": 2}, schema)
    with pytest.raises(ServerError) as caught:
        check_tool_args("t", {"nme": "x"}, schema)
    assert "no argument 'nme' (did you mean 'name'?)" in caught.value.problem
    assert "missing required 'name'" in caught.value.problem
    assert "its arguments: count, name (required)" in caught.value.problem and caught.value.fix
    with pytest.raises(ServerError, match="missing required 'name'"):
        check_tool_args("t", {"count": 1}, schema | {"additionalProperties": True})
    open_schemas: list[dict[str, Any] | None] = [
        schema | {"additionalProperties": True},
        schema | {"additionalProperties": {"type": "string"}},
        schema | {"patternProperties": {"^x": {}}},
        {"type": "object"},
        None,
    ]
    for open_schema in open_schemas:
        check_tool_args("t", {"name": "x", "extra": 1}, open_schema)  # extra names allowed
    with pytest.raises(ServerError, match="no argument 'extra'"):
        check_tool_args("t", {"name": "x", "extra": 1}, schema | {"additionalProperties": False})


def test_a_tool_error_exits_non_zero_with_the_reason(model_dir: Path) -> None:
    proc = localsample("call", "--server", SERVER, "echo", "--arg", "text=x", "--arg", "times=many")
    assert proc.returncode == 1
    assert "times" in proc.stderr and "integer" in proc.stderr


def test_a_server_that_dies_or_is_missing_is_a_clear_error(model_dir: Path) -> None:
    crashed = localsample("call", "--server", SERVER, "crash")
    assert crashed.returncode == 1
    assert "closed the connection" in crashed.stderr and "fix:" in crashed.stderr
    missing = localsample("call", "--server", "definitely-not-a-command-42", "x")
    assert missing.returncode == 1
    assert "command not found: definitely-not-a-command-42" in missing.stderr


def test_server_spec_forms() -> None:
    spec = ServerSpec.parse("writer=python 'my server.py' --flag", env={"K": "V"})
    assert spec.name == "writer" and spec.command == ["python", "my server.py", "--flag"]
    assert ServerSpec.parse("python tools/blog_tagger.py").name == "blog_tagger"
    remote = ServerSpec.parse("https://example.test:8443/mcp")
    assert remote.url == "https://example.test:8443/mcp" and remote.name == "example.test"
    assert ServerSpec.parse("api=http://127.0.0.1:9/mcp").name == "api"
    for bad in ["", "python 'unclosed", "http://"]:
        with pytest.raises(ServerSpecError):
            ServerSpec.parse(bad)
    with pytest.raises(ServerSpecError, match="--protocol"):
        ServerSpec.parse("python x.py", protocol="2020-01-01")


def test_tool_arguments_follow_the_schema() -> None:
    schema = {"properties": {"name": {"type": "string"}, "n": {"type": "integer"}, "tags": {"type": "array"}}}
    args = parse_tool_args(["name=42", "n=3", 'tags=["a"]', "extra=true"], '{"n": 1, "z": null}', schema)
    assert args == {"name": "42", "n": 3, "tags": ["a"], "extra": True, "z": None}
    with pytest.raises(ServerError, match="not key=value"):
        parse_tool_args(["novalue"], None, schema)
    with pytest.raises(ServerError, match="not a valid integer"):
        parse_tool_args(["n=three"], None, schema)
    with pytest.raises(ServerError, match="JSON object"):
        parse_tool_args([], "[1]", schema)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_serve_listen_serves_streamable_http(model_dir: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "localsample", "serve", "--server", SERVER, "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=os.environ | {"LOCALSAMPLE_TOKEN": "test-token"},
    )
    try:

        async def as_host() -> str:
            url = f"http://127.0.0.1:{port}/mcp"
            with anyio.fail_after(60):
                while True:  # wait for the port to open
                    try:
                        await (await anyio.connect_tcp("127.0.0.1", port)).aclose()
                        break
                    except OSError:
                        await anyio.sleep(0.2)
                with pytest.raises(BaseException) as refused:  # no token: refused
                    async with Client(url) as client:
                        await client.list_tools()
                cause = first_cause(refused.value)
                assert isinstance(cause, MCPError) and "bearer token" in str(cause)
                headers = {"Authorization": "Bearer test-token"}
                async with (
                    httpx2.AsyncClient(headers=headers, timeout=60) as http,
                    Client(streamable_http_client(url, http_client=http)) as client,
                ):
                    result = await client.call_tool("write", {"topic": "owls", "max_tokens": 6})
            return result.content[0].text  # type: ignore[union-attr]

        sampled = json.loads(anyio.run(as_host))
        assert sampled["model"] == "smollm2-135m-instruct"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_serve_refuses_a_non_loopback_listen_without_allow_remote() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "localsample", "serve", "--server", SERVER, "--listen", "0.0.0.0:8765"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "0.0.0.0" in proc.stderr and "--allow-remote" in proc.stderr and "--token" in proc.stderr
