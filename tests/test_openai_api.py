"""The OpenAI-compatible API (openai_api.py, openai_map.py) on FakeGenerators, driven by the
official ``openai`` client over an in-process ASGI transport: request mapping, model
resolution, error shapes, streaming, the audit trail, cancellation. Fast: no model loads
(generation itself is tested through the daemon, on the real model, in test_daemon.py)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam
from starlette.types import Message

from localsample.catalog import ModelEntry, load_catalog
from localsample.generation import GenerationRequest
from localsample.openai_api import OpenAIServer
from localsample.runtime import Runtime
from localsample.settings import ServerSettings, Settings

from .conftest import FakeGenerator, real_model_dir

pytestmark = pytest.mark.anyio
SMOL = "smollm2-135m-instruct"
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]
WEATHER: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CLOCK: ChatCompletionToolParam = {"type": "function", "function": {"name": "clock"}}
GHOST = '[[models]]\nid = "ghost"\nsource = "ghost-model.gguf"\naliases = ["phantom"]\n'


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Api:
    runtime: Runtime
    server: OpenAIServer
    http: httpx2.AsyncClient
    client: openai.AsyncOpenAI
    made: list[FakeGenerator]
    logs: Path

    @property
    def requests(self) -> list[GenerationRequest]:
        return [r for g in self.made for r in g.requests]

    def audit(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (self.logs / "audit.jsonl").read_text().splitlines()]

    async def post(self, body: bytes | dict[str, Any], **headers: str) -> httpx2.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await self.http.post("/v1/chat/completions", content=content, headers=headers)


@asynccontextmanager
async def api(tmp_path: Path, extra_catalog: str = "", **settings: Any) -> AsyncIterator[Api]:
    """The API over a runtime of FakeGenerators: the packaged catalog plus 'ghost' (never
    downloaded)."""
    catalog_path = tmp_path / "models.toml"
    catalog_path.write_text(GHOST + extra_catalog)
    base = Settings(model_dir=real_model_dir(), catalog_path=catalog_path, log_dir=tmp_path / "logs", **settings)
    made: list[FakeGenerator] = []

    def make(model: ModelEntry, path: Path, slots: int) -> FakeGenerator:
        made.append(FakeGenerator(model, path, slots))
        return made[-1]

    runtime = Runtime(base, load_catalog(catalog_path), factory=make)
    server = OpenAIServer(runtime)
    transport = httpx2.ASGITransport(app=server.app())
    async with httpx2.AsyncClient(transport=transport, base_url="http://local") as http:
        client = openai.AsyncOpenAI(api_key="unused", base_url="http://local/v1", http_client=http, max_retries=0)
        try:
            yield Api(runtime, server, http, client, made, tmp_path / "logs")
        finally:
            runtime.close()


# -- models ---------------------------------------------------------------------------------


async def test_models_lists_every_catalog_id_and_resolves_aliases(tmp_path: Path) -> None:
    async with api(tmp_path) as a:
        page = await a.client.models.list()
        assert [m.id for m in page.data] == a.runtime.catalog.ids()
        assert {m.owned_by for m in page.data} == {"localsample"} and {m.object for m in page.data} == {"model"}
        assert (await a.client.models.retrieve("haiku")).id == SMOL
        with pytest.raises(openai.NotFoundError, match="no model 'nope'"):
            await a.client.models.retrieve("nope")


# -- request mapping ------------------------------------------------------------------------


async def test_a_conversation_with_tools_maps_onto_the_generation_request(tmp_path: Path) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
        {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "user", "content": "And the time?"},
    ]
    async with api(tmp_path) as a:
        answer = await a.client.chat.completions.create(
            model=SMOL,
            messages=messages,
            tools=[WEATHER, CLOCK],
            tool_choice={"type": "function", "function": {"name": "clock"}},
            max_completion_tokens=30,
            max_tokens=99,  # max_completion_tokens wins
            temperature=0.5,
            top_p=0.9,
            seed=7,
            stop=["x", "y"],
        )
        [request] = a.requests
    assert request.system == "Be brief.\n\nUse tools."
    assert [(m.role, m.content) for m in request.messages] == [
        ("user", "Weather in Paris?"),
        ("assistant", ""),
        ("tool", "sunny"),
        ("user", "And the time?"),
    ]
    [call] = request.messages[1].tool_calls
    assert (call.id, call.name, dict(call.arguments)) == ("c1", "weather", {"city": "Paris"})
    assert request.messages[2].tool_call_id == "c1"
    assert [t.name for t in request.tools] == ["clock"] and request.tool_choice == "required"
    assert request.tools[0].input_schema == {"type": "object", "properties": {}}
    assert (request.max_tokens, request.temperature, request.top_p, request.seed) == (30, 0.5, 0.9, 7)
    assert tuple(request.stop) == ("x", "y")
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [made] = choice.message.tool_calls or []
    assert made.type == "function" and made.function.name == "clock" and json.loads(made.function.arguments) == {}
    assert made.id and answer.model == SMOL


async def test_text_answers_report_stop_sequences_lengths_and_usage(tmp_path: Path) -> None:
    async with api(tmp_path) as a:
        stopped = await a.client.chat.completions.create(model=SMOL, messages=HELLO, stop="four", max_tokens=20)
        choice = stopped.choices[0]
        assert choice.message.content == "one two three " and choice.finish_reason == "stop"
        assert (choice.model_extra or {})["stop_reason"] == "four"
        cut = await a.client.chat.completions.create(model=SMOL, messages=HELLO, max_tokens=3)
        assert cut.choices[0].finish_reason == "length" and (cut.choices[0].model_extra or {})["stop_reason"] is None
        assert cut.usage is not None and cut.usage.completion_tokens == 3
        assert cut.usage.total_tokens == cut.usage.prompt_tokens + 3
        assert cut.id.startswith("chatcmpl-") and cut.id != stopped.id and cut.object == "chat.completion"


async def test_response_format_becomes_the_response_schema(tmp_path: Path) -> None:
    schema: dict[str, Any] = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    async with api(tmp_path) as a:
        await a.client.chat.completions.create(
            model=SMOL,
            messages=HELLO,
            max_tokens=3,
            response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
        )
        await a.client.chat.completions.create(
            model=SMOL, messages=HELLO, max_tokens=3, response_format={"type": "json_object"}
        )
        await a.client.chat.completions.create(
            model=SMOL, messages=HELLO, max_tokens=3, response_format={"type": "text"}
        )
        assert [r.response_schema for r in a.requests] == [schema, {"type": "object"}, None]
        with pytest.raises(openai.BadRequestError, match="cannot be combined with tools") as refused:
            await a.client.chat.completions.create(
                model=SMOL, messages=HELLO, tools=[WEATHER], response_format={"type": "json_object"}
            )
        assert refused.value.param == "response_format"


async def test_max_tokens_defaults_to_the_clients_cap_or_1024(tmp_path: Path) -> None:
    async with api(tmp_path, servers={"capped": ServerSettings(max_tokens=40)}) as a:
        await a.client.chat.completions.create(model=SMOL, messages=HELLO, stop=["two"])
        await a.client.chat.completions.create(
            model=SMOL, messages=HELLO, stop=["two"], extra_headers={"X-Localsample-Client": "capped"}
        )
        assert [r.max_tokens for r in a.requests] == [1024, 40]


async def test_unknown_fields_are_ignored(tmp_path: Path) -> None:
    body = {"model": SMOL, "messages": HELLO, "max_tokens": 2, "user": "u", "logit_bias": {"1": 2}, "store": False}
    async with api(tmp_path) as a:
        response = await a.post(body)
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == "one two"


# -- refusals -------------------------------------------------------------------------------


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": SMOL, "messages": HELLO, **fields}


@pytest.mark.parametrize(
    ("body", "param", "expected"),
    [
        (b'{"model": ', None, "not valid JSON"),
        (b"[1, 2]", None, "must be a JSON object"),
        ({"messages": HELLO}, "model", "model: field required"),
        (chat(max_tokens="5"), "max_tokens", 'max_tokens: input should be a valid integer (got "5")'),
        (chat(max_completion_tokens=0), "max_completion_tokens", "must be positive (got 0)"),
        (chat(temperature=3), "temperature", "between 0 and 2 (got 3"),
        (chat(top_p=0), "top_p", "top_p is out of range"),
        (chat(seed=2**40), "seed", "seed is out of range"),
        (chat(n=2), "n", "only one choice"),
        (chat(stream="yes"), "stream", "valid boolean"),
        (chat(stop=5), "stop", "stop: input should be a valid string or"),
        (chat(stop=["x"] * 33), "stop", "stop has 33 entries; at most 32"),
        (chat(messages=[]), "messages", "no messages"),
        (chat(messages=[{"role": "function", "content": "x"}]), "messages[0].role", "messages[0].role"),
        (chat(messages=[{"role": "user", "content": 5}]), "messages[0].content", "valid string"),
        (
            chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
            "messages[0].content[0]",
            "image_url.url is not a base64 data: URI",
        ),
        (
            chat(messages=[*HELLO, {"role": "tool", "tool_call_id": "nope", "content": "x"}]),
            "messages[1].tool_call_id",
            "answers no pending tool call",
        ),
        (
            chat(
                messages=[
                    {
                        "role": "assistant",
                        "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{"}}],
                    },
                    {"role": "tool", "tool_call_id": "c", "content": "x"},
                ]
            ),
            "messages[0].tool_calls[0].function.arguments",
            "is not a JSON object",
        ),
        (
            chat(
                messages=[
                    {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": ""}}]}
                ]
            ),
            "messages",
            "have no tool message",
        ),
        (chat(tools=[WEATHER], tool_choice="sometimes"), "tool_choice", "tool_choice"),
        (
            chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "clock"}}),
            "tool_choice",
            "names the function 'clock', which tools does not offer",
        ),
        (chat(tool_choice="required"), "tool_choice", "tools is empty"),
        (chat(tools=[WEATHER, WEATHER]), "tools[1].function.name", "offered twice"),
        (
            chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]),
            "tools[0].function.parameters",
            "type object",
        ),
        (chat(response_format={"type": "xml"}), "response_format", "response_format.type must be"),
    ],
)
async def test_bad_requests_are_400_naming_the_field_and_the_app_keeps_serving(
    tmp_path: Path, body: bytes | dict[str, Any], param: str | None, expected: str
) -> None:
    async with api(tmp_path) as a:
        response = await a.post(body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param
        assert expected in error["message"] and "fix:" in error["message"], error["message"]
        [line] = a.audit()
        assert line["decision"] == "error" and line["origin"] == "openai" and expected in line["error"]
        assert (await a.post(chat(max_tokens=1))).status_code == 200


async def test_a_bad_client_header_is_400(tmp_path: Path) -> None:
    async with api(tmp_path) as a:
        response = await a.post(chat(), **{"X-Localsample-Client": "a b/c"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "X-Localsample-Client"


async def test_unknown_routes_and_methods_get_openai_errors(tmp_path: Path) -> None:
    async with api(tmp_path) as a:
        missing = await a.http.get("/v1/nothing")
        wrong = await a.http.get("/v1/chat/completions")
    assert missing.status_code == 404 and "Not Found" in missing.json()["error"]["message"]
    assert wrong.status_code == 405 and wrong.json()["error"]["type"] == "invalid_request_error"


# -- which model answers --------------------------------------------------------------------


async def test_names_are_ids_aliases_or_hints_and_the_answer_names_the_local_model(tmp_path: Path) -> None:
    async with api(tmp_path) as a:
        for name in ("smollm2-135m-instruct", "HAIKU", "gpt-4o-mini", "claude-3-5-haiku-latest"):
            answer = await a.client.chat.completions.create(model=name, messages=HELLO, max_tokens=1)
            assert answer.model == SMOL, name
        reasons = [line["reason"] for line in a.audit()]
    assert reasons[:2] == ["named explicitly ('smollm2-135m-instruct')", "named explicitly ('HAIKU')"]
    assert "hint 'gpt-4o-mini' matched 'smollm2-135m-instruct'" in reasons[2]
    assert "hint 'claude-3-5-haiku-latest' matched" in reasons[3]


async def test_a_clients_pin_and_allow_list_bind_the_model_it_names(tmp_path: Path) -> None:
    twin = '[[models]]\nid = "twin"\nsource = "SmolLM2-135M-Instruct.Q4_1.gguf"\n'  # downloaded
    servers = {"pinned": ServerSettings(model="twin"), "allowed": ServerSettings(allow_models=["twin"])}
    async with api(tmp_path, twin, servers=servers) as a:
        for client in ("pinned", "allowed"):
            answer = await a.client.chat.completions.create(
                model=SMOL, messages=HELLO, max_tokens=1, extra_headers={"X-Localsample-Client": client}
            )
            assert answer.model == "twin", client
        free = await a.client.chat.completions.create(model=SMOL, messages=HELLO, max_tokens=1)
        assert free.model == SMOL
        reasons = [line["reason"] for line in a.audit()]
    assert "pinned for server 'pinned'" in reasons[0]


async def test_a_name_matching_nothing_is_404_listing_the_known_ids(tmp_path: Path) -> None:
    async with api(tmp_path) as a:
        with pytest.raises(openai.NotFoundError) as unknown:
            await a.client.chat.completions.create(model="llama-9000", messages=HELLO)
        for model_id in a.runtime.catalog.ids():
            assert model_id in unknown.value.message
        assert unknown.value.code == "model_not_found"
        with pytest.raises(openai.NotFoundError, match=r"'ghost' is in the catalog but not downloaded") as ghost:
            await a.client.chat.completions.create(model="phantom", messages=HELLO, stream=True)
        assert "localsample models pull ghost" in ghost.value.message and ghost.value.code == "model_not_found"
        assert [line["decision"] for line in a.audit()] == ["error", "error"]


# -- policy, limits, busy -------------------------------------------------------------------


async def test_the_client_header_names_the_requester_for_settings_and_audit(tmp_path: Path) -> None:
    servers = {"my-app": ServerSettings(requests_per_minute=1), "denied": ServerSettings(approve="deny")}
    async with api(tmp_path, servers=servers) as a:
        mine = {"X-Localsample-Client": "my-app"}
        await a.client.chat.completions.create(model=SMOL, messages=HELLO, max_tokens=2, extra_headers=mine)
        with pytest.raises(openai.RateLimitError, match="requests_per_minute") as limited:
            await a.client.chat.completions.create(model=SMOL, messages=HELLO, max_tokens=2, extra_headers=mine)
        assert limited.value.code == "rate_limit_exceeded"
        with pytest.raises(openai.PermissionDeniedError, match="approve = deny"):
            await a.client.chat.completions.create(
                model=SMOL, messages=HELLO, extra_headers={"X-Localsample-Client": "denied"}
            )
        await a.client.chat.completions.create(model=SMOL, messages=HELLO, max_tokens=2)
        lines = a.audit()
    assert [(x["server"], x["origin"], x["decision"]) for x in lines] == [
        ("my-app", "openai", "approved"),
        ("my-app", "openai", "rejected"),
        ("denied", "openai", "rejected"),
        ("openai", "openai", "approved"),
    ]
    assert lines[0]["completion_tokens"] == 2 and lines[0]["request_id"].startswith("chatcmpl-")


async def test_a_busy_model_is_503_and_retryable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FakeGenerator, "delay", 0.02)
    async with api(tmp_path, queue_limit=1) as a, anyio.create_task_group() as group:
        group.start_soon(lambda: a.client.chat.completions.create(model=SMOL, messages=HELLO, max_tokens=100))
        await anyio.sleep(0.2)
        with pytest.raises(openai.InternalServerError, match="retry later") as busy:
            await a.client.chat.completions.create(model=SMOL, messages=HELLO, max_tokens=1)
        assert busy.value.status_code == 503 and busy.value.response.headers["retry-after"] == "1"
        group.cancel_scope.cancel()


# -- streaming ------------------------------------------------------------------------------


async def test_a_stream_sends_role_text_finish_and_usage_chunks_then_done(tmp_path: Path) -> None:
    async with api(tmp_path) as a:
        stream = await a.client.chat.completions.create(
            model="haiku", messages=HELLO, max_tokens=4, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
        raw = await a.post(chat(max_tokens=2, stream=True))
    first, *texts, finish, usage = chunks
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert "".join(c.choices[0].delta.content or "" for c in texts) == "one two three four" and len(texts) == 4
    assert finish.choices[0].finish_reason == "length" and finish.choices[0].delta.content is None
    assert usage.choices == [] and usage.usage is not None and usage.usage.completion_tokens == 4
    assert all(c.usage is None for c in chunks[:-1])
    assert {c.id for c in chunks} == {first.id} and {c.model for c in chunks} == {SMOL}
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [line for line in raw.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: {") for e in events[:-1])
    assert all("usage" not in json.loads(e.removeprefix("data: ")) for e in events[:-1])  # not asked for


async def test_a_streamed_stop_sequence_and_tool_calls(tmp_path: Path) -> None:
    async with api(tmp_path) as a:
        stopped = [
            c
            async for c in await a.client.chat.completions.create(
                model=SMOL, messages=HELLO, stop=["three"], stream=True
            )
        ]
        called = [
            c
            async for c in await a.client.chat.completions.create(
                model=SMOL, messages=HELLO, tools=[WEATHER], tool_choice="required", stream=True
            )
        ]
    assert "".join(c.choices[0].delta.content or "" for c in stopped) == "one two "
    assert stopped[-1].choices[0].finish_reason == "stop"
    assert (stopped[-1].choices[0].model_extra or {})["stop_reason"] == "three"
    [delta] = [c.choices[0].delta for c in called if c.choices[0].delta.tool_calls]
    [call] = delta.tool_calls or []
    assert call.index == 0 and call.id and call.function is not None and call.function.name == "weather"
    assert json.loads(call.function.arguments or "") == {}
    assert called[-1].choices[0].finish_reason == "tool_calls"


# -- cancellation ---------------------------------------------------------------------------


async def run_and_leave(server: OpenAIServer, body: dict[str, Any], after: float) -> list[Message]:
    """Send ``body`` as raw ASGI, disconnect after ``after`` seconds; what the app sent."""
    sent: list[Message] = []
    messages = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await anyio.sleep(after)
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "headers": [(b"host", b"local"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
        "server": ("local", 80),
    }
    with anyio.fail_after(5):
        await server.app()(scope, receive, send)
    return sent


@pytest.mark.parametrize("stream", [False, True])
async def test_a_client_that_disconnects_cancels_its_generation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stream: bool
) -> None:
    monkeypatch.setattr(FakeGenerator, "delay", 0.02)
    async with api(tmp_path) as a:
        sent = await run_and_leave(a.server, chat(max_tokens=400, stream=stream), after=0.3)
        [line] = a.audit()
        assert line["decision"] == "cancelled"
        assert not any(m.get("body", b"").startswith(b"data: [DONE]") for m in sent)
        assert (await a.post(chat(max_tokens=1))).status_code == 200  # and it keeps serving


async def test_stop_cancels_requests_in_flight_and_refuses_new_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(FakeGenerator, "delay", 0.02)
    async with api(tmp_path) as a:
        responses: list[httpx2.Response] = []

        async def long() -> None:
            responses.append(await a.post(chat(max_tokens=400)))

        async with anyio.create_task_group() as group:
            group.start_soon(long)
            await anyio.sleep(0.2)
            a.server.stop()
        late = await a.post(chat(max_tokens=1))
        assert [line["decision"] for line in a.audit()] == ["cancelled", "busy"]
    assert responses[0].status_code == 503 and "stopped while generating" in responses[0].json()["error"]["message"]
    assert late.status_code == 503 and "stopping" in late.json()["error"]["message"]
