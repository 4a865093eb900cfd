"""A ``GenerationRequest`` as an OpenAI chat-completions request body (the client side).

The reverse of openai_map.py's ``to_generation_request``: what localsample sends when
another process generates — an attached client to its daemon, or a catalog entry that
names a remote OpenAI-compatible engine. Mapping a request there and back gives the same
request: sampler values OpenAI has no field for (``top_k``, ``min_p``,
``repeat_penalty``) are sent under the names llama.cpp's servers and localsample read.
"""

from __future__ import annotations

import json
from typing import Any

from localsample.generation import ChatMessage, GenerationRequest, ToolCall
from localsample.openai_content import content_body

__all__ = ["chat_body", "message_body", "tool_call_body"]


def tool_call_body(call: ToolCall) -> dict[str, Any]:
    arguments = json.dumps(dict(call.arguments), ensure_ascii=False)
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": arguments}}


def message_body(message: ChatMessage) -> dict[str, Any]:
    """One turn in OpenAI's shape (an assistant turn's calls; a tool turn's call id; a user
    turn's images and audio as content parts)."""
    body: dict[str, Any] = {"role": message.role, "content": content_body(message)}
    if message.tool_calls:
        body["tool_calls"] = [tool_call_body(call) for call in message.tool_calls]
    if message.tool_call_id is not None:
        body["tool_call_id"] = message.tool_call_id
    return body


def chat_body(request: GenerationRequest, model: str) -> dict[str, Any]:
    """The request body for ``POST /v1/chat/completions`` (``stream`` is the caller's)."""
    messages = [{"role": "system", "content": request.system}] if request.system else []
    messages += [message_body(message) for message in request.messages]
    body: dict[str, Any] = {"model": model, "messages": messages, "max_completion_tokens": request.max_tokens}
    if request.stop:
        body["stop"] = list(request.stop)
    sampler = {
        "temperature": request.temperature,
        "top_p": request.top_p,
        "top_k": request.top_k,
        "min_p": request.min_p,
        "repeat_penalty": request.repeat_penalty,
        "seed": request.seed,
    }
    body.update({key: value for key, value in sampler.items() if value is not None})
    if request.tools:
        body["tools"] = [
            {
                "type": "function",
                "function": {"name": t.name, "description": t.description, "parameters": dict(t.input_schema)},
            }
            for t in request.tools
        ]
        body["tool_choice"] = request.tool_choice
    if request.response_schema is not None:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "response", "schema": dict(request.response_schema), "strict": True},
        }
    return body
