"""Sampling over MCP, in-process: a real SDK server asks, localsample answers on the real model.

`mode="legacy"` connects with the initialize handshake (2025-11-25: the server pushes
sampling/createMessage); `mode="auto"` reaches the in-process server on 2026-07-28, where
sampling rides in an InputRequiredResult and the SDK's Client retries the call.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from localsample.catalog import load_catalog
from localsample.engine import Engine
from localsample.runtime import Runtime
from localsample.sampling import SamplingHandler
from localsample.settings import Settings

from .servers.sampling_server import server

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def runtime(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    own = tmp_path_factory.mktemp("sampling")
    settings = Settings(
        model_dir=model_dir,
        catalog_path=own / "models.toml",
        log_dir=own / "logs",
        state_dir=own / "state",
    )
    rt = Runtime(settings, load_catalog(None))
    yield rt
    rt.close()


async def call(runtime: Runtime, tool: str, mode: str = "legacy", **arguments: Any) -> dict[str, Any]:
    async with Client(server, sampling_callback=SamplingHandler(runtime, server="test"), mode=mode) as client:
        result = await client.call_tool(tool, arguments)
    assert not result.is_error, result.content
    text = result.content[0].text  # type: ignore[union-attr]
    return json.loads(text)  # type: ignore[no-any-return]


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_both_eras_are_answered_by_the_local_model(runtime: Runtime, mode: str) -> None:
    result = await call(runtime, "write", mode, topic="the sea", max_tokens=12)
    assert result["model"] == "smollm2-135m-instruct"
    assert result["role"] == "assistant"
    assert result["content"]["type"] == "text" and result["content"]["text"].strip()
    assert result["stopReason"] in ("endTurn", "maxTokens")


async def test_eras_give_the_same_greedy_text(runtime: Runtime) -> None:
    legacy = await call(runtime, "write", "legacy", topic="bread", max_tokens=16)
    modern = await call(runtime, "write", "auto", topic="bread", max_tokens=16)
    assert legacy["content"]["text"] == modern["content"]["text"]


async def test_mapping_of_stop_system_and_max_tokens(runtime: Runtime) -> None:
    full = (await call(runtime, "push", max_tokens=30))["result"]
    assert full["stopReason"] == "maxTokens"
    stop = full["content"]["text"].split()[3]
    cut = (await call(runtime, "push", max_tokens=30, stop=[stop]))["result"]
    assert cut["stopReason"] == "stopSequence"
    assert cut["content"]["text"] == full["content"]["text"][: full["content"]["text"].index(stop)]
    pirate = (await call(runtime, "push", max_tokens=30, system="You are a pirate. Say arr."))["result"]
    assert pirate["content"]["text"] != full["content"]["text"]  # the system prompt reached the model


async def test_metadata_sampling_keys_reach_llama_cpp(runtime: Runtime) -> None:
    def run(seed: int) -> Any:
        return call(runtime, "push", max_tokens=20, temperature=1.0, metadata={"seed": seed, "top_k": 50, "x": 1})

    first, again, other = (await run(7))["result"], (await run(7))["result"], (await run(8))["result"]
    assert first["content"]["text"] == again["content"]["text"]  # the seed was used
    assert first["content"]["text"] != other["content"]["text"]


async def test_unknown_hint_falls_back_to_the_default_model(runtime: Runtime) -> None:
    result = (await call(runtime, "push", max_tokens=3, hints=["gpt-7-ultra", "../../etc/passwd"]))["result"]
    assert result["model"] == "smollm2-135m-instruct"


async def test_progress_notifications_carry_the_growing_text(runtime: Runtime) -> None:
    report = await call(runtime, "push", max_tokens=120, progress=True)
    progress, text = report["progress"], report["result"]["content"]["text"]
    assert len(progress) >= 2  # 120 tokens take well over 0.1 s
    assert all(p["total"] == 120 for p in progress)
    values = [p["progress"] for p in progress]
    assert values == sorted(values) and values[-1] <= 120
    messages = [p["message"] for p in progress]
    assert all(text.startswith(m) for m in messages)  # each is the text so far
    assert len(set(messages)) == len(messages)  # and it grows


async def test_progress_never_shows_a_partial_stop_sequence(runtime: Runtime) -> None:
    full = (await call(runtime, "push", max_tokens=120))["result"]["content"]["text"]
    stop = full[60:75]
    report = await call(runtime, "push", max_tokens=120, progress=True, stop=[stop])
    cut = report["result"]["content"]["text"]
    assert report["result"]["stopReason"] == "stopSequence" and cut == full[: full.index(stop)]
    messages = [update["message"] for update in report["progress"]]
    assert messages and messages[0]  # progress arrived, with text
    # Every update is text the server may keep: a prefix of the final answer, so it never
    # runs past the cut into a stop sequence, even partly (one is held back until decided).
    assert all(cut.startswith(message) for message in messages), (cut, messages)


async def test_cancellation_stops_generation_and_the_next_request_works(runtime: Runtime) -> None:
    engine = runtime.pool.generator(runtime.catalog.get("smollm2-135m-instruct"))
    assert isinstance(engine, Engine)
    before = engine.tokens_generated
    report = await call(runtime, "push", max_tokens=2000, timeout=0.5)
    assert report["timed_out"] is True and "result" not in report
    await anyio.sleep(0.3)
    stopped_at = engine.tokens_generated
    assert stopped_at - before < 300  # stopped long before 2000 tokens
    await anyio.sleep(0.3)
    assert engine.tokens_generated == stopped_at  # and is not still running
    after = await call(runtime, "push", max_tokens=5)
    assert after["result"]["stopReason"] == "maxTokens"


# The validation errors (bad maxTokens, empty messages, images, tools, temperature,
# metadata) are mapped before any model runs: tests/test_pipeline.py checks every one of
# them quickly. Here, what needs the real engine: its exact token count.


async def test_context_overflow_gives_the_three_numbers(runtime: Runtime) -> None:
    # Fits the selection's estimate, not the exact count: the engine refuses with exact numbers.
    message = (await call(runtime, "push", max_tokens=8156))["error"]["message"]
    assert "maxTokens (8156)" in message and "n_ctx = 8192" in message and "prompt (" in message
    # Fits no model at all: selection refuses, with its estimate and every model's n_ctx.
    message = (await call(runtime, "push", max_tokens=9000))["error"]["message"]
    assert "maxTokens 9000" in message and "n_ctx 8192 <" in message


async def test_the_daemon_keeps_serving_after_bad_requests(runtime: Runtime) -> None:
    handler = SamplingHandler(runtime, server="test")
    async with Client(server, sampling_callback=handler, mode="legacy") as client:
        bad = await client.call_tool("push", {"max_tokens": 0})
        good = await client.call_tool("push", {"max_tokens": 4})
    assert "error" in json.loads(bad.content[0].text)  # type: ignore[union-attr]
    assert json.loads(good.content[0].text)["result"]["stopReason"] == "maxTokens"  # type: ignore[union-attr]


async def test_concurrent_sampling_requests_are_all_answered(runtime: Runtime) -> None:
    handler = SamplingHandler(runtime, server="test")
    results: dict[int, dict[str, Any]] = {}
    async with Client(server, sampling_callback=handler, mode="legacy") as client:

        async def one(i: int) -> None:
            result = await client.call_tool("push", {"text": f"Count to {i}.", "max_tokens": 8})
            results[i] = json.loads(result.content[0].text)  # type: ignore[union-attr]

        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(one, i)
    assert sorted(results) == [0, 1, 2, 3]
    assert all(r["result"]["stopReason"] == "maxTokens" for r in results.values())
