"""A request sent over the OpenAI API (to the daemon, to a remote engine) arrives unchanged."""

from __future__ import annotations

import json

import pytest

from localsample.generation import ChatMessage, GenerationRequest, ToolCall, ToolSpec
from localsample.openai_map import parse_chat, to_generation_request
from localsample.openai_request import chat_body

WEATHER = ToolSpec(
    "weather",
    "The weather in a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)

REQUESTS = [
    GenerationRequest(messages=[ChatMessage("user", "Hi")], max_tokens=7),
    GenerationRequest(
        messages=[ChatMessage("user", "Say a word")],
        max_tokens=33,
        system="Be brief.",
        stop=("\n\n", "END"),
        temperature=0.2,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        repeat_penalty=1.1,
        seed=7,
    ),
    GenerationRequest(
        messages=[
            ChatMessage("user", "Weather in Paris?"),
            ChatMessage("assistant", "", tool_calls=(ToolCall("call_1", "weather", {"city": "Paris"}),)),
            ChatMessage("tool", "sunny", tool_call_id="call_1"),
        ],
        max_tokens=64,
        tools=(WEATHER,),
        tool_choice="required",
    ),
    GenerationRequest(
        messages=[ChatMessage("user", "A colour as JSON")],
        max_tokens=40,
        response_schema={"type": "object", "properties": {"colour": {"type": "string"}}},
    ),
]


@pytest.mark.parametrize("request_", REQUESTS, ids=["plain", "sampler", "tools", "schema"])
def test_round_trip(request_: GenerationRequest) -> None:
    body = chat_body(request_, "some-model")
    assert body["model"] == "some-model"
    back = to_generation_request(parse_chat(json.dumps(body).encode()))
    assert back.messages == list(request_.messages)
    for name in ("max_tokens", "system", "stop", "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed"):
        assert getattr(back, name) == getattr(request_, name), name
    assert back.tools == tuple(request_.tools)
    assert back.tool_choice == request_.tool_choice
    assert back.response_schema == request_.response_schema
