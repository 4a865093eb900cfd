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
    assert generator.why_unavailable().startswith("offline: its endpoints (http://gpu-box.invalid:8000/v1)")


def test_an_endpoint_that_does_not_answer_makes_selection_fall_back_and_say_why(isolated: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    remote_catalog(isolated, dead)
    runtime = Runtime(load_settings(), factory=fake_factory())
    choice = runtime.select(needs=Needs(), prefs=Preferences(hints=("far",)), server="s")
    assert choice.model.id == "smollm2-135m-instruct"
    assert f"hint 'far' matched only box (no endpoint answers ({dead}" in choice.reason
    why = runtime.pool.why_unavailable(runtime.catalog.get("box"))
    assert why.startswith(f"no endpoint answers ({dead}: no answer to GET /models")


def generator_body(isolated: Path, request: GenerationRequest) -> dict[str, object]:
    settings = load_settings()
    return RemoteGenerator(load_catalog(settings.catalog_path).get("box"), settings).body(request)


def test_stop_strings_are_not_sent_and_max_tokens_is(isolated: Path) -> None:
    remote_catalog(isolated, "http://127.0.0.1:9/v1")
    settings = load_settings()
    body = RemoteGenerator(load_catalog(settings.catalog_path).get("box"), settings).body(HI)
    assert "stop" not in body and body["max_tokens"] == 5 and body["model"] == "box"
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    penalised = generator_body(isolated, GenerationRequest(messages=HI.messages, max_tokens=5, repeat_penalty=1.1))
    assert penalised["repeat_penalty"] == penalised["repetition_penalty"] == 1.1  # llama.cpp's and vLLM's names


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


def test_models_list_and_show_give_each_endpoint_and_its_state(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from localsample.cli import app

    dead = f"http://127.0.0.1:{free_port()}/v1"
    (isolated / "models.toml").write_text(
        f'[[models]]\nid = "box"\nendpoints = ["{dead}", "http://gpu-box.invalid:8000/v1"]\n'
        'remote_model = "qwen"\napi_key_env = "BOX_KEY"\naliases = ["far"]\n'
    )
    monkeypatch.setenv("LOCALSAMPLE_OFFLINE", "1")  # the non-loopback endpoint is not contacted
    runner = CliRunner()
    listed = runner.invoke(app, ["models", "list"]).stdout.splitlines()
    assert any(line.startswith("box") and line.endswith("remote: 0/2 endpoints answer") for line in listed)
    assert f"box: {dead} failing (no answer to GET /models" in "\n".join(listed)
    assert "box: http://gpu-box.invalid:8000/v1 offline: not used" in listed
    shown = runner.invoke(app, ["models", "show", "far"]).stdout
    assert "remote model  qwen" in shown and "key from      BOX_KEY" in shown and "pull" not in shown
    data = json.loads(runner.invoke(app, ["models", "show", "far", "--json"]).stdout)
    assert data["status"] == "remote" and [e["url"] for e in data["endpoints"]] == [
        dead,
        "http://gpu-box.invalid:8000/v1",
    ]


def test_remote_models_take_no_room_in_the_pool(isolated: Path) -> None:
    """A remote model is always ready and holds no local memory: it neither counts toward
    max_loaded_models nor gets unloaded to make room or by keep-alive."""
    remote_catalog(isolated, "http://127.0.0.1:9/v1")
    runtime = Runtime(load_settings(max_loaded_models=1, keep_alive=0.01), factory=fake_factory())
    box = runtime.catalog.get("box")
    runtime.pool.resident(box)  # in use earlier (nothing contacted)
    local = runtime.catalog.get("smollm2-135m-instruct")
    anyio.run(runtime.pool.load, local)
    assert [r.model.id for r in runtime.pool.loaded()] == ["box", local.id]
    assert runtime.pool.reap(now=1e12) == [local.id]
