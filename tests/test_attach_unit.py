"""The attached client's pieces that need no daemon: errors crossing the socket keep their
class (so their MCP code), answers keep every field, and without a daemon (or with
``daemon = never``) a command runs in-process."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from localsample.attach import AttachedRuntime, client_runtime, completion_of, status_error
from localsample.errors import (
    SERVER_BUSY,
    BusyError,
    ContextOverflowError,
    LocalsampleError,
    RateLimitError,
    RejectedError,
    UnknownModelError,
    rebuilt,
)
from localsample.generation import Completion, ToolCall
from localsample.runtime import Runtime
from localsample.settings import load_settings


@pytest.mark.parametrize("cls", [BusyError, RateLimitError, UnknownModelError, ContextOverflowError])
def test_an_error_sent_by_the_daemon_is_rebuilt_as_its_own_class(cls: type[LocalsampleError]) -> None:
    error = rebuilt(cls.__name__, "the problem", "the fix")
    assert type(error) is cls and error.mcp_code == cls.mcp_code
    assert error.one_line() == "the problem (fix: the fix)"


def test_an_unknown_error_class_becomes_a_plain_localsample_error() -> None:
    assert type(rebuilt("NoSuchError", "p", None)) is LocalsampleError
    assert type(rebuilt("Exception", "p", None)) is LocalsampleError  # not a class of ours: never built


def test_an_http_refusal_before_the_stream_maps_to_the_error_it_stands_for() -> None:
    busy = status_error(503, json.dumps({"error": {"message": "busy: 8 running", "type": "server_error"}}).encode())
    assert isinstance(busy, BusyError) and busy.mcp_code == SERVER_BUSY and "busy: 8 running" in busy.problem
    assert isinstance(status_error(403, b"{}"), RejectedError)
    assert type(status_error(502, b"<html>bad gateway</html>")).__name__ == "EngineError"


def test_an_answer_crosses_with_every_field() -> None:
    completion = Completion(
        text="Sunny",
        model="m",
        stop_reason="toolUse",
        stop_sequence=None,
        prompt_tokens=12,
        completion_tokens=5,
        time_to_first_token=0.01,
        duration=0.2,
        tool_calls=(ToolCall("call_1", "weather", {"city": "Paris"}),),
    )
    sent = json.loads(json.dumps(dataclasses.asdict(completion) | {"field_of_a_newer_daemon": 1}))
    assert completion_of(sent) == completion


def test_without_a_daemon_or_with_daemon_never_a_command_runs_in_process(isolated: Path) -> None:
    settings = load_settings()
    assert type(client_runtime(settings, "test")) is Runtime  # auto, and no socket
    (settings.state_dir / "run").mkdir(parents=True)
    (settings.state_dir / "run" / "daemon.sock").touch()  # left by a daemon that crashed
    assert type(client_runtime(settings, "test")) is Runtime
    never = settings.model_copy(update={"daemon": "never"})
    assert not isinstance(client_runtime(never, "test"), AttachedRuntime)
