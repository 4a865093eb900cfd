"""Remote catalog entries without an engine: offline mode refuses non-loopback endpoints
without contacting them, an endpoint that does not answer makes selection fall back with
the reason, what is sent and what is accepted back (stop strings matched here, tool calls
checked against their schemas)."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from localsample.catalog import load_catalog
from localsample.errors import EngineError, ToolCallError
from localsample.generation import ChatMessage, GenerationRequest, ToolSpec
from localsample.remote import RemoteGenerator, is_loopback
from localsample.runtime import Runtime
from localsample.selection import Needs, Preferences
from localsample.settings import load_settings

from .conftest import fake_factory
from .daemon_process import free_port

HI = GenerationRequest(messages=[ChatMessage("user", "Hi")], max_tokens=5, stop=("\n",))


def remote_catalog(isolated: Path, url: str) -> None:
    (isolated / "models.toml").write_text(f'[[models]]\nid = "box"\nendpoint = "{url}"\naliases = ["far"]\n')


def test_loopback_is_recognised() -> None:
    assert all(is_loopback(u) for u in ["http://127.0.0.1:8000/v1", "http://localhost/v1", "http://[::1]:9/v1"])
    assert not any(is_loopback(u) for u in ["http://gpu-box:8000/v1", "https://10.0.0.5/v1", "http://8.8.8.8/v1"])


def test_offline_refuses_a_non_loopback_endpoint_without_contacting_it(isolated: Path) -> None:
    remote_catalog(isolated, "http://gpu-box.invalid:8000/v1")
    settings = load_settings(offline=True)
    generator = RemoteGenerator(load_catalog(settings.catalog_path).get("box"), settings)
    assert not generator.available()
    assert generator.replicas[0].checked < 0  # never probed: nothing was contacted
    with pytest.raises(EngineError, match="offline mode refuses") as refused:
        anyio.run(generator.generate, HI)
    assert "drop --offline" in str(refused.value)


def test_an_endpoint_that_does_not_answer_makes_selection_fall_back_and_say_why(isolated: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    remote_catalog(isolated, dead)
    runtime = Runtime(load_settings(), factory=fake_factory())
    choice = runtime.select(needs=Needs(), prefs=Preferences(hints=("far",)), server="s")
    assert choice.model.id == "smollm2-135m-instruct"
    assert f"hint 'far' matched only box (no endpoint answers ({dead}" in choice.reason


def test_stop_strings_are_not_sent_and_max_tokens_is(isolated: Path) -> None:
    remote_catalog(isolated, "http://127.0.0.1:9/v1")
    settings = load_settings()
    body = RemoteGenerator(load_catalog(settings.catalog_path).get("box"), settings).body(HI)
    assert "stop" not in body and body["max_tokens"] == 5 and body["model"] == "box"
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_a_tool_call_that_breaks_its_schema_is_refused(isolated: Path) -> None:
    remote_catalog(isolated, "http://127.0.0.1:9/v1")
    settings = load_settings()
    generator = RemoteGenerator(load_catalog(settings.catalog_path).get("box"), settings)
    tool = ToolSpec("weather", "", {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
    request = GenerationRequest(messages=[ChatMessage("user", "Paris?")], max_tokens=40, tools=(tool,))
    replica = generator.replicas[0]
    good = generator.tool_call(request, {"id": "c1", "name": "weather", "arguments": '{"city": "Paris"}'}, replica)
    assert good.arguments == {"city": "Paris"}
    for name, arguments in [("weather", '{"town": "Paris"}'), ("weather", "{not json"), ("other", "{}")]:
        with pytest.raises(ToolCallError, match="malformed tool call"):
            generator.tool_call(request, {"id": "c", "name": name, "arguments": arguments}, replica)


def test_catalog_entries_are_local_or_remote(isolated: Path) -> None:
    (isolated / "models.toml").write_text(
        '[[models]]\nid = "box"\nendpoints = ["http://a:1/v1", "http://b:2/v1/"]\nremote_model = "qwen"\n'
    )
    entry = load_catalog(load_settings().catalog_path).get("box")
    assert entry.remote and entry.urls == ["http://a:1/v1", "http://b:2/v1"]
    assert json.loads(entry.model_dump_json())["source"] == ""
