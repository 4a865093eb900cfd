"""Concurrent requests on one real model: decoded together, each exactly as it would be
alone; fair; cancellable inside a running batch; prefixes reused across interleaving
requests. And a model load never swallows what other threads write to stdout."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from localsample.engine import Engine
from localsample.errors import BusyError
from localsample.generation import ChatMessage, GenerationRequest

from .conftest import small_entry

pytestmark = pytest.mark.anyio

PROMPTS = [
    "Say hello in one short sentence.",
    "Write a long story about a lighthouse keeper and the sea.",
    "List three fruits and their colours.",
    "Explain what a compiler does.",
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def greedy(text: str, max_tokens: int = 48, system: str | None = None) -> GenerationRequest:
    messages = [ChatMessage("user", text)]
    return GenerationRequest(messages=messages, max_tokens=max_tokens, temperature=0.0, system=system)


@pytest.fixture
def fresh(model_dir: Path) -> Engine:
    entry = small_entry()
    return Engine(entry, model_dir / entry.source, slots=4)


async def test_concurrent_requests_decode_together_and_match_their_solo_runs(fresh: Engine) -> None:
    solo = []
    for prompt in PROMPTS:
        await fresh.reset_cache()
        solo.append((await fresh.generate(greedy(prompt))).text)
    await fresh.reset_cache()
    together: dict[int, str] = {}

    async def one(i: int) -> None:
        together[i] = (await fresh.generate(greedy(PROMPTS[i]))).text

    async with anyio.create_task_group() as group:
        for i in range(len(PROMPTS)):
            group.start_soon(one, i)
    assert [together[i] for i in range(len(PROMPTS))] == solo
    assert fresh.batcher is not None and fresh.batcher.widest_step == len(PROMPTS)  # really batched
    fresh.close()


async def test_a_request_takes_its_shared_prefix_from_a_running_one(fresh: Engine) -> None:
    """A second request with the same system prompt joins while the first generates: it
    takes the prompt's cells from the running slot instead of evaluating them again, and
    answers exactly as when it reuses the first's cache after the first has finished."""
    system = " ".join(f"Rule {i}: be kind." for i in range(12))  # well over MIN_REUSE tokens
    first, second = greedy(PROMPTS[1], 30, system), greedy(PROMPTS[2], 20, system)
    await fresh.generate(first)
    expected = await fresh.generate(second)  # from the idle slot's cache
    await fresh.reset_cache()
    batcher = fresh.batcher
    assert batcher is not None
    going = anyio.Event()
    results = {}

    async def on_text(_text: str, tokens: int) -> None:
        if tokens >= 3:
            going.set()

    async def run_first() -> None:
        results["first"] = await fresh.generate(first, on_text)

    async with anyio.create_task_group() as group:
        group.start_soon(run_first)
        await going.wait()
        before = batcher.prompt_tokens_evaluated
        results["second"] = await fresh.generate(second)
        evaluated = batcher.prompt_tokens_evaluated - before
    assert batcher.widest_step == 2  # the first was still generating beside it
    assert evaluated < expected.prompt_tokens // 3  # the system prompt came from the running slot
    assert results["second"].text == expected.text
    assert len([slot for slot in batcher.slots if slot.tokens]) == 2  # each in a slot of its own
    fresh.close()


async def test_parallel_requests_with_one_system_prompt_evaluate_it_once(fresh: Engine) -> None:
    """Three requests arrive at once with the same long system prompt (parallel tool
    calls): the later two wait for the first one's prompt and take its cells."""
    system = " ".join(f"Rule {i}: be kind and brief." for i in range(40))
    await fresh.ensure_loaded()
    assert fresh.batcher is not None
    results = {}

    async def one(i: int) -> None:
        results[i] = await fresh.generate(greedy(PROMPTS[i], 8, system))

    async with anyio.create_task_group() as group:
        for i in range(3):
            group.start_soon(one, i)
    prompts = [results[i].prompt_tokens for i in range(3)]
    assert min(prompts) > 300  # a long shared prefix indeed
    assert fresh.batcher.prompt_tokens_evaluated < max(prompts) + 2 * 40  # once, plus the questions
    assert all(results[i].stop_reason in ("maxTokens", "endTurn") and results[i].text for i in range(3))
    fresh.close()


async def test_a_short_request_starts_while_a_long_one_runs(fresh: Engine) -> None:
    stamps: dict[str, float] = {}

    async def long() -> None:
        story = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle."
        result = await fresh.generate(greedy(story, max_tokens=150, system="You are a storyteller."))
        stamps["long_done"] = time.perf_counter()
        assert result.stop_reason == "maxTokens"  # it really was still running

    async def short_first_text(_text: str, _tokens: int) -> None:
        stamps.setdefault("short_first", time.perf_counter())

    await fresh.ensure_loaded()
    async with anyio.create_task_group() as group:
        group.start_soon(long)
        await anyio.sleep(0.3)
        await fresh.generate(greedy(PROMPTS[0], max_tokens=5), short_first_text)
        stamps["short_done"] = time.perf_counter()
    assert stamps["short_first"] < stamps["short_done"] < stamps["long_done"]
    fresh.close()


async def test_cancelling_one_request_inside_a_batch_leaves_the_other_intact(fresh: Engine) -> None:
    expected = (await fresh.generate(greedy(PROMPTS[2], max_tokens=60))).text
    await fresh.reset_cache()
    result: dict[str, str] = {}
    with anyio.CancelScope() as doomed:

        async def victim(_text: str, tokens: int) -> None:
            if tokens >= 5:
                doomed.cancel()

        async with anyio.create_task_group() as group:

            async def survivor() -> None:
                with anyio.CancelScope(shield=True):
                    result["text"] = (await fresh.generate(greedy(PROMPTS[2], max_tokens=60))).text

            group.start_soon(survivor)
            await fresh.generate(greedy(PROMPTS[1], max_tokens=500), victim)
    assert doomed.cancelled_caught
    with anyio.fail_after(30):
        while "text" not in result:
            await anyio.sleep(0.05)
    assert result["text"] == expected
    assert fresh.batcher is not None
    assert all(slot.active is None for slot in fresh.batcher.slots)  # the slot was freed
    fresh.close()


async def test_a_request_queued_past_its_timeout_is_busy_and_leaves_the_queue(model_dir: Path) -> None:
    entry = small_entry()
    one = Engine(entry, model_dir / entry.source, slots=1)
    running = anyio.Event()
    results: list[str] = []

    async def first_token(_text: str, _tokens: int) -> None:
        running.set()

    async with anyio.create_task_group() as group:

        async def long() -> None:
            results.append((await one.generate(greedy(PROMPTS[1], max_tokens=150), first_token)).stop_reason)

        group.start_soon(long)
        with anyio.fail_after(60):
            await running.wait()
        started = time.monotonic()
        with pytest.raises(BusyError, match=r"waited 0.3 s for a free slot .* \(1 requests running, 1 waiting\)"):
            await one.generate(greedy(PROMPTS[0], max_tokens=10), queue_timeout=0.3)
        assert time.monotonic() - started < 2.0  # at the deadline, not when the slot frees up
        assert one.batcher is not None and one.batcher.queued == 0  # it left the queue
    assert results == ["maxTokens"]  # the running request was not disturbed
    one.close()


async def test_interleaved_system_prompts_keep_their_cached_prefix(fresh: Engine) -> None:
    system_a = " ".join(f"Rule {i}: be kind." for i in range(40))
    system_b = " ".join(f"Law {i}: be brief." for i in range(40))
    await fresh.generate(greedy("First question.", 2, system_a))
    await fresh.generate(greedy("Second question.", 2, system_b))
    assert fresh.batcher is not None
    before = fresh.batcher.prompt_tokens_evaluated
    third = await fresh.generate(greedy("Third question.", 2, system_a))
    evaluated = fresh.batcher.prompt_tokens_evaluated - before
    assert evaluated < third.prompt_tokens // 4  # only the new question, not system A again
    fresh.close()


def test_loading_a_model_does_not_swallow_stdout(model_dir: Path) -> None:
    """Regression: llama-cpp-python's verbose=False pointed fd 1 at /dev/null during a load,
    losing whatever other threads wrote there (in `serve`, MCP replies to the host)."""
    script = f"""
import os, threading, time
from tests.conftest import small_entry
from localsample.engine import Engine
entry = small_entry()
engine = Engine(entry, {str(model_dir)!r} + "/" + entry.source)
loader = threading.Thread(target=engine.load)
loader.start()
for i in range(300):
    os.write(1, f"line {{i}}\\n".encode())
    time.sleep(0.002)
loader.join()
"""
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=root)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"line {i}" for i in range(300)]


@pytest.mark.parametrize(("setting", "expected"), [(None, -1), (True, 1), (False, 0)])
def test_the_catalogs_flash_attention_setting_reaches_the_batch_context(
    model_dir: Path, setting: bool | None, expected: int
) -> None:
    """Unset means llama.cpp's auto (-1); an explicit false really turns it off (it once
    fell through to auto)."""
    entry = small_entry() if setting is None else small_entry(flash_attn=setting)
    engine = Engine(entry, model_dir / entry.source, slots=2)
    engine.load()
    assert engine.batcher is not None and engine.batcher.flash_attn_type == expected
    engine.close()
