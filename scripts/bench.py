"""Benchmark localsample against raw llama-cpp-python on the same model and prompt.

    python scripts/bench.py [--model ID] [--tokens N] [--rounds R]

1. One request, five ways: decode tokens/s, time to first token (TTFT) and whole-request
   time of
     raw defaults   llama-cpp-python `create_chat_completion(stream=True)` as a user runs it
                    (its own defaults: flash attention off): the baseline of every ratio
     raw fa on      the same with flash attention on
     engine         localsample's Engine.generate with the catalog's settings
     engine fa on   the same with flash attention forced on
     e2e            an MCP server (scripts/bench_server.py) pushes the request over stdio with a
                    progress token; localsample answers it; the server times the first progress
                    notification (TTFT) and the tokens after it up to the result (decode rate)
   Every side evaluates the whole prompt each round (no cache) and decodes greedily to
   exactly N tokens.
2. The latency localsample and MCP add per request: 4-token requests end to end vs the
   engine alone (prompt cached after the first round, on both sides).
3. 1, 2, 4, 8 requests at once vs one after another: aggregate tokens/s, p50/p95 latency.
4. Time to first token with a ~1000-token system prompt: cold vs already evaluated.
5. Resident memory with the model loaded.
6. Tool calls: the grammar's cost in decode speed, and well-formed calls over 50 prompts
   (scripts/bench_tools.py).
7. An agent task (`localsample run`, 3 steps with tool calls): prompt tokens each step
   evaluates with prefix reuse vs without, and its time vs raw llama-cpp-python
   (scripts/bench_agent.py).
Decode under contention (other processes on the cores) is scripts/bench_contention.py.
Each side runs in a process of its own and rounds alternate, so drift hits all alike.
Medians over R rounds. All load the model with the catalog's settings.

Each side runs in a process of its own: llama.cpp's OpenMP threads spin after each token,
and two llama.cpp users in one process (one per calling thread) slow each other down.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, cast

import anyio
from llama_cpp import Llama
from mcp.shared.exceptions import MCPDeprecationWarning

from localsample.catalog import ModelEntry
from localsample.engine import Engine
from localsample.generation import ChatMessage, GenerationRequest
from localsample.runtime import Runtime

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_agent import agent_section
from bench_tools import tools_section


def engine_of(runtime: Runtime, model: ModelEntry) -> Engine:
    """The in-process llama.cpp engine the pool made for ``model`` (what the bench measures)."""
    generator = runtime.pool.generator(model)
    assert isinstance(generator, Engine)
    return generator


# Sampling is deprecated in the 2026-07-28 spec; answering it is what is measured (the CLI
# filters this warning the same way).
warnings.filterwarnings("ignore", category=MCPDeprecationWarning)

PROMPT = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle."
SYSTEM = "You are a storyteller. Write vivid prose."


@dataclass
class Sample:
    ttft: float  # seconds from the call to the first text
    decode_tps: float  # tokens after the first, over the time after the first
    tokens: int
    seconds: float = 0.0  # the whole request


def bench_raw(llama: Llama, max_tokens: int) -> Sample:
    llama.reset()  # type: ignore[no-untyped-call]  # llama-cpp-python leaves it unannotated
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}]
    started = time.perf_counter()
    first = last = 0.0
    finish = None
    stream = llama.create_chat_completion(
        messages=messages,  # type: ignore[arg-type]
        max_tokens=max_tokens,
        temperature=0.0,
        top_k=40,
        top_p=0.95,
        min_p=0.05,
        repeat_penalty=1.0,
        stream=True,
    )
    for chunk in cast(Iterator[dict[str, Any]], stream):
        choice = chunk["choices"][0]
        if choice["delta"].get("content"):
            last = time.perf_counter()
            first = first or last
        finish = choice.get("finish_reason") or finish
    if finish != "length":
        raise SystemExit(f"raw run ended with {finish!r} before {max_tokens} tokens: use a longer prompt")
    done = time.perf_counter()
    return Sample(first - started, (max_tokens - 1) / (last - first), max_tokens, done - started)


def bench_engine(engine: Engine, max_tokens: int) -> Sample:
    request = engine_request(max_tokens)
    times: list[float] = []

    async def on_text(_text: str, _tokens: int) -> None:
        times.append(time.perf_counter())

    async def run() -> Sample:
        await engine.reset_cache()
        started = time.perf_counter()
        result = await engine.generate(request, on_text)
        done = time.perf_counter()
        if result.completion_tokens != max_tokens:
            raise SystemExit(f"engine run ended with {result.stop_reason} before {max_tokens} tokens")
        return Sample(times[0] - started, (max_tokens - 1) / (times[-1] - times[0]), max_tokens, done - started)

    return asyncio.run(run())


METADATA: dict[str, Any] = {"top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.0}


def engine_request(max_tokens: int) -> GenerationRequest:
    """What localsample's sampling handler makes of the bench server's request."""
    return GenerationRequest(
        messages=[ChatMessage("user", PROMPT)], system=SYSTEM, max_tokens=max_tokens, temperature=0.0, **METADATA
    )


def e2e_side(model_id: str, conn: Connection) -> None:
    """Answer the bench server's sampling through localsample's MCP client, per request.
    A round is (tokens, cold): cold rounds start with an empty prompt cache."""
    from mcp import Client, StdioServerParameters

    from localsample.sampling import SamplingHandler

    runtime = Runtime()
    engine = engine_of(runtime, runtime.catalog.get(model_id))
    handler = SamplingHandler(runtime, server="bench")
    server = StdioServerParameters(command=sys.executable, args=[str(Path(__file__).parent / "bench_server.py")])

    async def serve_rounds() -> None:
        async with Client(server, sampling_callback=handler, mode="legacy") as client:

            async def one(tokens: int, cold: bool) -> Sample:
                if cold:
                    await engine.reset_cache()
                arguments = {"prompt": PROMPT, "system": SYSTEM, "max_tokens": tokens, "metadata": METADATA}
                result = await client.call_tool("timed_sample", arguments)
                report = json.loads(result.content[0].text)  # type: ignore[union-attr]
                if report["stop_reason"] != "maxTokens" or report["model"] != model_id:
                    raise SystemExit(f"unexpected end-to-end result: {report}")
                first_at, first_tokens = report["first_progress"] or (report["seconds"], tokens)
                decode_seconds = report["seconds"] - first_at
                decode_tps = (tokens - first_tokens) / decode_seconds if decode_seconds > 0 else 0.0
                return Sample(first_at, decode_tps, tokens, report["seconds"])

            await one(8, True)
            conn.send("ready")
            while (job := await anyio.to_thread.run_sync(conn.recv)) is not None:
                conn.send(await one(*job))

    anyio.run(serve_rounds)
    runtime.close()


def engine_alone_side(model_id: str, conn: Connection) -> None:
    """The same request sequence straight into the engine, timed around generate()."""
    runtime = Runtime()
    engine = engine_of(runtime, runtime.catalog.get(model_id))

    async def one(tokens: int) -> float:
        started = time.perf_counter()
        result = await engine.generate(engine_request(tokens))
        if result.completion_tokens != tokens:
            raise SystemExit(f"engine stopped early: {result.stop_reason}")
        return time.perf_counter() - started

    asyncio.run(one(8))
    conn.send("ready")
    while (job := conn.recv()) is not None:
        conn.send(asyncio.run(one(job[0])))
    runtime.close()


def median(samples: list[Sample], key: Callable[[Sample], float]) -> float:
    return statistics.median(key(s) for s in samples)


def side(name: str, model_id: str, conn: Connection) -> None:
    """A benchmark side in its own process: load, then run one round per request."""
    runtime = Runtime()
    model = runtime.catalog.get(model_id)
    engine = engine_of(runtime, model)
    if name.startswith("raw"):
        kwargs = model.load.llama_kwargs()
        if name == "raw defaults":  # llama-cpp-python as a user runs it: its own flash_attn default (off)
            kwargs.pop("flash_attn", None)
        else:  # "raw fa on": flash attention on, as llama.cpp's "auto" has it on a CPU
            kwargs["flash_attn"] = True
        llama = Llama(model_path=str(engine.path), verbose=False, chat_format="chat_template.default", **kwargs)
        run: Callable[[int], Sample] = lambda n: bench_raw(llama, n)  # noqa: E731
    else:
        if name == "engine fa on":
            load = model.load.model_copy(update={"flash_attn": True})
            engine = Engine(model.model_copy(update={"load": load}), engine.path, slots=runtime.settings.parallel)
        asyncio.run(engine.ensure_loaded())
        run = lambda n: bench_engine(engine, n)  # noqa: E731
    run(8)  # warm up
    conn.send("ready")
    while (job := conn.recv()) is not None:
        conn.send(run(job[0]))  # raw and engine rounds are always cold
    runtime.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="catalog id (default: the default model)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument(
        "--sections",
        default="1,3,4,6,7",
        help="comma list: 1 (one request and overhead, 1-2), "
        "3 (concurrency), 4 (cache and memory, 4-5), 6 (tool calls), 7 (agent steps)",
    )
    args = parser.parse_args()
    chosen = set(args.sections.split(","))

    runtime = Runtime()
    model = runtime.catalog.get(args.model or runtime.settings.default_model)
    threads = model.load.llama_kwargs()["n_threads"]
    print(f"model {model.id}, {args.tokens} tokens greedy, median of {args.rounds} alternating rounds")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, n_threads={threads}")

    if "1" in chosen:
        single_section(model, args)
    if "3" in chosen:
        concurrency_section(model.id, 64)
    if "4" in chosen:
        cache_and_memory_section(model.id)
    if "6" in chosen:
        tools_section(model)
    if "7" in chosen:
        agent_section(model)


def single_section(model: ModelEntry, args: argparse.Namespace) -> None:
    """(1) one request, raw vs engine vs end to end; (2) the latency MCP adds."""
    names = ["raw defaults", "raw fa on", "engine", "engine fa on"]
    sides: dict[str, Side] = {name: partial(side, name) for name in names} | {"e2e": e2e_side}
    runs = run_sides(sides, model.id, argparse.Namespace(tokens=args.tokens, rounds=args.rounds, cold=True))
    print(f"\n1. one request, {args.tokens} tokens, cold prompt: raw llama-cpp-python vs localsample")
    print("   ratio: to raw llama-cpp-python with its own defaults (flash attention off), a user's baseline")
    print(f"{'':14}{'decode tok/s':>14}{'ratio':>7}{'TTFT ms':>10}{'ratio':>7}{'total ms':>10}{'ratio':>7}")
    base = runs["raw defaults"]
    for name in sides:
        tps, ttft = median(runs[name], lambda s: s.decode_tps), median(runs[name], lambda s: s.ttft)
        total = median(runs[name], lambda s: s.seconds)
        print(
            f"{name:14}{tps:>14.1f}{tps / median(base, lambda s: s.decode_tps):>7.3f}"
            f"{ttft * 1e3:>10.1f}{ttft / median(base, lambda s: s.ttft):>7.3f}"
            f"{total * 1e3:>10.1f}{total / median(base, lambda s: s.seconds):>7.3f}"
        )
    print("   engine: the catalog's settings; e2e: an MCP server's request answered through localsample;")
    print("   fa on: flash attention on (what keeps batched greedy outputs bit-identical to solo runs).")
    print("   target: engine total time <= 1/0.97 of raw defaults")

    # The overhead per request is a few ms: measured on short requests, where run-to-run
    # noise (about 1% of the request time) is smaller than it.
    sides = {"engine": engine_alone_side, "e2e": e2e_side}
    short = run_sides(sides, model.id, argparse.Namespace(tokens=4, rounds=max(args.rounds, 30), cold=False))
    short_alone, short_e2e = statistics.median(short["engine"]), statistics.median(s.seconds for s in short["e2e"])
    print("\n2. latency added by MCP over stdio + localsample (4-token requests, prompt cached)")
    print(f"{'':26}{'engine':>9}{'e2e MCP':>9}{'added':>7}")
    print(
        f"{'request ms':26}{short_alone * 1e3:>9.1f}{short_e2e * 1e3:>9.1f}"
        f"{(short_e2e - short_alone) * 1e3:>7.1f}   (aim <= 15)"
    )


def concurrency_section(model_id: str, tokens: int, rounds: int = 3) -> None:
    """(b) N requests at once vs the same N one after another: aggregate tokens/s (median
    of ``rounds``), latency per request (over all rounds)."""
    runtime = Runtime()
    choice = runtime.select(model=model_id)

    def request(i: int) -> GenerationRequest:
        return GenerationRequest(
            messages=[ChatMessage("user", f"Request {i}: {PROMPT}")],
            system=SYSTEM,
            max_tokens=tokens,
            temperature=0.0,
            **METADATA,
        )

    async def timed(i: int, latencies: list[float]) -> int:
        started = time.perf_counter()
        result = await runtime.complete(choice, request(i))
        latencies.append(time.perf_counter() - started)
        return result.completion_tokens

    async def together(n: int) -> tuple[float, list[float]]:
        latencies: list[float] = []
        counts: list[int] = []
        started = time.perf_counter()
        async with anyio.create_task_group() as group:
            for i in range(n):
                group.start_soon(_collect, timed(i, latencies), counts)
        return sum(counts) / (time.perf_counter() - started), latencies

    async def serial(n: int) -> float:
        started, total = time.perf_counter(), 0
        for i in range(n):
            total += await timed(i, [])
        return total / (time.perf_counter() - started)

    widths = (1, 2, 4, 8)
    ceiling = raw_batched_decode(model_id, widths, tokens)
    print(f"\n3. concurrent requests, {tokens} tokens each (aggregate tokens/s, median of {rounds}; latency)")
    print(f"{'requests':>10}{'serial':>10}{'together':>10}{'ratio':>8}{'p50 s':>8}{'p95 s':>8}{'llama.cpp':>11}")
    anyio.run(serial, 1)  # warm up
    for n in widths:
        alones, aggs, lat = [], [], []
        for _ in range(rounds):  # alternate, so drift on a shared machine hits both alike
            alones.append(anyio.run(serial, n))
            agg_round, lat_round = anyio.run(together, n)
            aggs.append(agg_round)
            lat += lat_round
        alone, agg = statistics.median(alones), statistics.median(aggs)
        lat.sort()
        p95 = lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))]
        raw = ceiling[n] / ceiling[1]
        note = "   (target >= 2.0)" if n == 4 else ""
        print(
            f"{n:>10}{alone:>10.1f}{agg:>10.1f}{agg / alone:>8.2f}{statistics.median(lat):>8.2f}{p95:>8.2f}"
            f"{raw:>10.2f}x{note}"
        )
    print("   llama.cpp: its own decode rate for that many sequences in one batch vs one sequence (raw")
    print("   llama_decode, no sampling or streaming): the most batching can give on this model and machine")
    print("   What evaluating each prompt alone costs (the engine does, so batched greedy outputs equal solo")
    print("   runs): raw llama.cpp, N prompts one llama_decode each vs all in one, and how many sequences'")
    print("   16-token greedy continuations came out the same both ways:")
    for n in widths[1:]:
        alone_s, joint_s, same = ceiling[("prompts", n)]
        print(
            f"{n:>10} prompts: alone {alone_s * 1e3:.0f} ms, together {joint_s * 1e3:.0f} ms "
            f"(saves {(alone_s - joint_s) * 1e3:.0f} ms a burst); same output {same}/{n}"
        )
    runtime.close()


def raw_batched_decode(model_id: str, widths: tuple[int, ...], tokens: int, rounds: int = 3) -> dict[Any, Any]:
    """Decode tokens/s of raw llama.cpp with N sequences in one batch, as llama-batched-bench
    measures it, in a context like the engine's: the ceiling for section 3's ratios."""
    context = multiprocessing.get_context("spawn")
    mine, theirs = context.Pipe()
    process = context.Process(target=raw_batched_side, args=(model_id, widths, tokens, rounds, theirs), daemon=True)
    process.start()
    result: dict[Any, Any] = mine.recv()
    process.join()
    return result


class RawBatch:
    """Raw llama.cpp in a context like the engine's (unified KV, one sequence per request)."""

    def __init__(self, model_id: str, sequences: int) -> None:
        import llama_cpp as L

        runtime = Runtime()
        model = runtime.catalog.get(model_id)
        load = model.load.llama_kwargs()
        path = engine_of(runtime, model).path
        self.llama = Llama(
            model_path=str(path), verbose=False, n_ctx=64, **{k: v for k, v in load.items() if k != "n_ctx"}
        )
        params = L.llama_context_default_params()
        params.n_ctx, params.n_seq_max, params.kv_unified = model.load.n_ctx, sequences, True
        params.n_threads, params.n_threads_batch = load["n_threads"], load["n_threads_batch"]
        self.ctx = L.llama_init_from_model(self.llama._model.model, params)
        self.memory, self.n_vocab = L.llama_get_memory(self.ctx), L.llama_vocab_n_tokens(self.llama._model.vocab)
        self.batch = L.llama_batch_init(512, 0, 1)

    def prompts(self, n: int) -> list[list[int]]:
        """Clear the KV cache; the bench's n prompts, tokenized."""
        import llama_cpp as L

        L.llama_memory_clear(self.memory, True)
        return [self.llama.tokenize(f"{SYSTEM}\nRequest {i}: {PROMPT}".encode(), add_bos=True) for i in range(n)]

    def decode(self, rows: list[tuple[int, int, int]], outputs: set[int] | None = None) -> None:
        import llama_cpp as L

        batch = self.batch
        batch.n_tokens = len(rows)
        for i, (token, pos, seq) in enumerate(rows):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0] = token, pos, 1, seq
            batch.logits[i] = outputs is None or i in outputs
        if L.llama_decode(self.ctx, batch) != 0:
            raise SystemExit("llama_decode failed")

    def argmax(self, row: int) -> int:
        import llama_cpp as L
        import numpy as np

        return int(np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, row), shape=(self.n_vocab,)).argmax())

    def close(self) -> None:
        import llama_cpp as L

        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)
        self.llama.close()


def raw_rate(raw: RawBatch, n: int, tokens: int) -> float:
    """Decode tokens/s with n sequences in every batch."""
    prompts = raw.prompts(n)
    for seq, prompt in enumerate(prompts):
        raw.decode([(token, pos, seq) for pos, token in enumerate(prompt)])
    next_tokens = [0] * n
    started = time.perf_counter()
    for step in range(tokens):
        raw.decode([(next_tokens[s], len(prompts[s]) + step, s) for s in range(n)])
        next_tokens = [raw.argmax(s) for s in range(n)]
    return n * tokens / (time.perf_counter() - started)


def raw_prompts(raw: RawBatch, n: int, together: bool) -> tuple[float, list[list[int]]]:
    """Seconds to evaluate n prompts one llama_decode each (the engine's way, so each prompt's
    KV equals a solo run's) or all in one, and each sequence's 16-token greedy text after."""
    texts = raw.prompts(n)
    started = time.perf_counter()
    if together:
        rows = [(token, pos, seq) for seq, text in enumerate(texts) for pos, token in enumerate(text)]
        ends = list(itertools.accumulate(len(text) for text in texts))
        raw.decode(rows, {end - 1 for end in ends})
        firsts = [raw.argmax(end - 1) for end in ends]
    else:
        firsts = []
        for seq, text in enumerate(texts):
            raw.decode([(token, pos, seq) for pos, token in enumerate(text)], {len(text) - 1})
            firsts.append(raw.argmax(len(text) - 1))
    elapsed = time.perf_counter() - started
    outputs = [[first] for first in firsts]
    for step in range(16):
        raw.decode([(outputs[s][-1], len(texts[s]) + step, s) for s in range(n)])
        for s in range(n):
            outputs[s].append(raw.argmax(s))
    return elapsed, outputs


def raw_batched_side(model_id: str, widths: tuple[int, ...], tokens: int, rounds: int, conn: Connection) -> None:
    raw = RawBatch(model_id, max(widths))
    raw_rate(raw, 1, tokens)  # warm up
    result: dict[Any, Any] = {n: statistics.median(raw_rate(raw, n, tokens) for _ in range(rounds)) for n in widths}
    for n in widths[1:]:
        alone = [raw_prompts(raw, n, False) for _ in range(rounds)]
        joint = [raw_prompts(raw, n, True) for _ in range(rounds)]
        same = sum(a == b for a, b in zip(alone[0][1], joint[0][1], strict=True))
        result[("prompts", n)] = (statistics.median(t for t, _ in alone), statistics.median(t for t, _ in joint), same)
    raw.close()
    conn.send(result)


async def _collect(job: Any, into: list[int]) -> None:
    into.append(await job)


def cache_and_memory_section(model_id: str) -> None:
    """(c) TTFT with a ~1000-token system prompt, cold vs already evaluated; (d) memory."""
    runtime = Runtime()
    engine = engine_of(runtime, runtime.catalog.get(model_id))
    before = rss_mb()
    asyncio.run(engine.ensure_loaded())
    loaded = rss_mb()
    system = " ".join(f"Rule {i}: answer politely, briefly and truthfully, and cite the rule." for i in range(60))

    async def ttft(user: str, cold: bool) -> tuple[float, int]:
        if cold:
            await engine.reset_cache()
        req = GenerationRequest(messages=[ChatMessage("user", user)], system=system, max_tokens=2, temperature=0.0)
        result = await engine.generate(req)
        return result.time_to_first_token, result.prompt_tokens

    cold, cached = [], []
    for i in range(5):
        cold.append(asyncio.run(ttft(f"Question {i}: what is rule 3?", cold=True))[0])
        cached.append(asyncio.run(ttft(f"Question {i + 10}: and rule 7?", cold=False))[0])
    prompt_tokens = asyncio.run(ttft("x", cold=False))[1]
    cold_ms, cached_ms = statistics.median(cold) * 1e3, statistics.median(cached) * 1e3
    print(f"\n4. time to first token, {prompt_tokens}-token prompt sharing its system prompt")
    print(f"{'cold ms':>12}{'cached ms':>12}{'ratio':>8}")
    print(f"{cold_ms:>12.1f}{cached_ms:>12.1f}{cached_ms / cold_ms:>8.3f}   (target <= 0.25)")

    async def parallel(n: int) -> tuple[int, list[float]]:
        """n requests at once with that system prompt, cold: tokens evaluated, TTFTs."""
        await engine.reset_cache()
        assert engine.batcher is not None
        before = engine.batcher.prompt_tokens_evaluated
        firsts: list[float] = []

        async def one(i: int) -> None:
            started = time.perf_counter()
            seen: list[float] = []

            async def on_text(_text: str, _tokens: int) -> None:
                seen.append(time.perf_counter() - started)

            req = GenerationRequest(
                messages=[ChatMessage("user", f"Question {i}: what is rule {i}?")],
                system=system,
                max_tokens=2,
                temperature=0.0,
            )
            await engine.generate(req, on_text)
            firsts.append(seen[0])

        async with anyio.create_task_group() as group:
            for i in range(n):
                group.start_soon(one, i)
        return engine.batcher.prompt_tokens_evaluated - before, sorted(firsts)

    evaluated, firsts = asyncio.run(parallel(4))
    print(
        f"   4 such requests at once, cold: {evaluated} prompt tokens evaluated (not 4 x {prompt_tokens}); "
        f"first tokens after {', '.join(f'{t * 1e3:.0f}' for t in firsts)} ms"
    )
    print(f"\n5. resident memory: {before:.0f} MB before loading, {loaded:.0f} MB with the model loaded")
    runtime.close()


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


Side = Callable[[str, Connection], None]
"""One side of a comparison: runs in its own process, answers rounds over the connection."""


def run_sides(targets: dict[str, Side], model_id: str, args: Any) -> dict[str, list[Any]]:
    """Start one process per side, then alternate rounds between them."""
    context = multiprocessing.get_context("spawn")
    sides: dict[str, tuple[BaseProcess, Connection]] = {}
    for name, target in targets.items():
        mine, theirs = context.Pipe()
        process = context.Process(target=target, args=(model_id, theirs), daemon=True)
        process.start()
        sides[name] = (process, mine)
        if mine.recv() != "ready":
            raise SystemExit(f"the {name} side did not start")
    runs: dict[str, list[Any]] = {name: [] for name in targets}
    for _ in range(args.rounds):
        for name, (_, conn) in sides.items():
            conn.send((args.tokens, args.cold))
            runs[name].append(conn.recv())
    for side_process, conn in sides.values():
        conn.send(None)
        side_process.join()
    return runs


if __name__ == "__main__":
    main()
