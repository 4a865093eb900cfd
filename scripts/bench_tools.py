"""Tool calls on a local model: what the grammar costs, and how often calls come out right.

    python scripts/bench_tools.py [--model ID] [--rounds R] [--prompts N]

(also section 6 of scripts/bench.py)

a. Decode tokens/s of tool-call requests (toolChoice "required", a 3-field schema) vs plain
   text requests of the same length, on the engine, with the same ratio for the peer: raw
   llama-cpp-python with the same grammar (``grammar=``, llama.cpp's grammar-first
   sampling over the whole vocabulary) vs raw plain. Greedy; the tool call's own length
   sets both sides' maxTokens. Target: engine ratio >= 0.9.
b. Well-formed calls over N varied prompts (five tools of different schemas, temperature
   0.8, a seed each): a call is well-formed when it names an offered tool and its input
   validates against that tool's inputSchema (jsonschema). Target: 100%.
Each part runs in this process, one side after the other, alternating rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jsonschema
from llama_cpp import Llama
from llama_cpp.llama_grammar import LlamaGrammar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from localsample.catalog import ModelEntry, resolve_model_path
from localsample.engine import Engine
from localsample.errors import ToolCallError
from localsample.generation import ChatMessage, GenerationRequest, ToolSpec
from localsample.grammar import calls_grammar, max_string
from localsample.runtime import Runtime
from localsample.toolcalls import template_messages

TICKET = ToolSpec(
    "create_ticket",
    "Open a support ticket.",
    {
        "type": "object",
        "properties": {
            "title": {"type": "string"},
            "priority": {"type": "string", "enum": ["low", "normal", "urgent"]},
            "estimate_hours": {"type": "integer", "minimum": 0, "maximum": 100},
        },
        "required": ["title", "priority", "estimate_hours"],
    },
)
TOOLS = [
    TICKET,
    ToolSpec(
        "get_weather",
        "The weather forecast for a city.",
        {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    ),
    ToolSpec(
        "tag_post",
        "Tag a blog post.",
        {
            "type": "object",
            "properties": {
                "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 5},
                "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            },
            "required": ["tags", "confidence"],
        },
    ),
    ToolSpec(
        "schedule_meeting",
        "Put a meeting in the calendar.",
        {
            "type": "object",
            "properties": {
                "attendees": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"name": {"type": "string"}, "optional": {"type": "boolean"}},
                        "required": ["name"],
                    },
                },
                "when": {"type": "object", "properties": {"day": {"type": "integer", "minimum": 1, "maximum": 31}}},
            },
            "required": ["attendees", "when"],
        },
    ),
    ToolSpec(
        "search_docs", "Search the documentation.", {"type": "object", "properties": {"query": {"type": "string"}}}
    ),
]
TOPICS = [
    "The printer on floor 3 is jammed again.",
    "Is it going to rain in Lisbon tomorrow?",
    "Post: ten tips for sourdough bread at home.",
    "Set up a call with Ana and Bo on the 12th.",
    "How do I rotate the API key?",
    "Our website is down for all customers!",
    "Weather in Nairobi in fahrenheit please.",
    "Post: why we moved our backend to Rust.",
    "Book a retro with the whole team on day 3.",
    "Find the page about rate limits.",
]


def tool_request(prompt: str, max_tokens: int, **fields: Any) -> GenerationRequest:
    return GenerationRequest(
        [ChatMessage("user", prompt)], max_tokens=max_tokens, tools=[TICKET], **{"tool_choice": "required", **fields}
    )


async def decode_part(engine: Engine, llama: Llama, rounds: int) -> None:
    """Both sides offer the tool, so both prompts hold the same tool prompt (decode slows as
    the context grows): the plain side in auto mode, which this model answers with text."""
    prompt, story = (
        "Create a ticket: the coffee machine in the kitchen leaks water.",
        "Write a long story about a lighthouse.",
    )
    first = await engine.generate(tool_request(prompt, 128, temperature=0.0))
    tokens = first.completion_tokens
    plain = tool_request(story, tokens, temperature=0.0, tool_choice="auto")
    call = tool_request(prompt, tokens, temperature=0.0)
    messages, _ = template_messages(call, engine.dialect)
    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    grammar = LlamaGrammar.from_string(calls_grammar([TICKET], engine.dialect, max_string(tokens)), verbose=False)
    rates: dict[str, list[float]] = {"engine plain": [], "engine tools": [], "raw plain": [], "raw grammar": []}
    for _ in range(rounds):
        rates["engine plain"].append((await engine.generate(plain)).decode_tokens_per_second)
        rates["engine tools"].append((await engine.generate(call)).decode_tokens_per_second)
        rates["raw plain"].append(raw_rate(llama, system, story, tokens, None))
        rates["raw grammar"].append(raw_rate(llama, system, prompt, tokens, grammar))
    med = {name: statistics.median(values) for name, values in rates.items()}
    print(f"\na. decode tokens/s, a {tokens}-token tool call vs plain text, same tool prompt (median of {rounds})")
    print(f"{'':16}{'plain':>9}{'tool call':>11}{'ratio':>7}")
    for name, note in (("engine", "(target >= 0.9)"), ("raw", "(llama.cpp: grammar first, whole vocabulary)")):
        plain_rate, tool_rate = med[f"{name} plain"], med["engine tools" if name == "engine" else "raw grammar"]
        print(f"{name:16}{plain_rate:>9.1f}{tool_rate:>11.1f}{tool_rate / plain_rate:>7.3f}   {note}")


def raw_rate(llama: Llama, system: str, prompt: str, tokens: int, grammar: LlamaGrammar | None) -> float:
    llama.reset()  # type: ignore[no-untyped-call]  # no prefix reuse: every round evaluates its prompt
    started, first = time.perf_counter(), 0.0
    count = 0
    stream = llama.create_chat_completion(
        [{"role": "system", "content": system}, {"role": "user", "content": prompt}],
        max_tokens=tokens,
        temperature=0.0,
        stream=True,
        grammar=grammar,
    )
    for chunk in stream:
        if chunk["choices"][0]["delta"].get("content"):  # type: ignore[union-attr, index]
            count += 1
            if count == 1:
                first = time.perf_counter()
    elapsed = time.perf_counter() - (first or started)
    return (count - 1) / elapsed if count > 1 and elapsed > 0 else 0.0


async def share_part(engine: Engine, prompts: int) -> None:
    good, truncated, invalid, tokens = 0, 0, 0, []
    started = time.perf_counter()
    for index in range(prompts):
        prompt = TOPICS[index % len(TOPICS)] + ("" if index < len(TOPICS) else f" (case {index})")
        request = GenerationRequest(
            [ChatMessage("user", prompt)],
            max_tokens=256,
            temperature=0.8,
            seed=index,
            tools=TOOLS,
            tool_choice="required",
        )
        try:
            completion = await engine.generate(request)
        except ToolCallError as exc:
            if "maxTokens" in exc.problem:
                truncated += 1
            else:  # a schema keyword the grammar cannot enforce: caught by the check after decoding
                invalid += 1
            continue
        by_name = {t.name: t for t in TOOLS}
        try:
            for call in completion.tool_calls:
                jsonschema.validate(dict(call.arguments), dict(by_name[call.name].input_schema))
        except (KeyError, jsonschema.ValidationError):
            invalid += 1
            continue
        good += 1
        tokens.append(completion.completion_tokens)
    seconds = time.perf_counter() - started
    print(f"\nb. well-formed calls over {prompts} prompts (5 tools, temperature 0.8, a seed each, maxTokens 256)")
    print(
        f"   well-formed {good}/{prompts} ({100 * good / prompts:.0f}%), "
        f"maxTokens ran out {truncated}, invalid {invalid}   (target 100%)"
    )
    if tokens:
        print(f"   median {statistics.median(tokens):.0f} tokens an answer, {seconds / prompts:.2f} s a request")


def tools_section(model: ModelEntry, rounds: int = 5, prompts: int = 50) -> None:
    runtime = Runtime()
    path = resolve_model_path(model, runtime.settings.model_dir)
    engine = Engine(model, path)
    engine.load()
    llama = Llama(model_path=str(path), verbose=False, **model.load.llama_kwargs())
    print(f"\n6. tool calls (model {model.id}, template dialect: {engine.dialect.name})")
    try:
        asyncio.run(decode_part(engine, llama, rounds))
        if prompts:
            asyncio.run(share_part(engine, prompts))
    finally:
        llama.close()
        engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="catalog id (default: the default model)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=50, help="prompts for part b (0: skip it)")
    args = parser.parse_args()
    runtime = Runtime()
    tools_section(runtime.catalog.get(args.model or runtime.settings.default_model), args.rounds, args.prompts)


if __name__ == "__main__":
    main()
