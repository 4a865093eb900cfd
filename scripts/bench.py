"""Benchmark localsample against raw llama-cpp-python on the same model and prompt.

    python scripts/bench.py [--model ID] [--tokens N] [--rounds R]

Prints, side by side, decode tokens/s and time to first token (TTFT) for:
  raw      llama-cpp-python `create_chat_completion(stream=True)`, the GGUF's chat template
  engine   localsample's Engine.generate (worker thread -> asyncio, stop matching)
and the ratio engine/raw. Both load the model with the catalog's settings, evaluate the
whole prompt each round (no cache), decode greedily to exactly N tokens, and alternate
rounds so drift hits both alike. Medians over R rounds.

Each side runs in a process of its own: llama.cpp's OpenMP threads spin after each token,
and two llama.cpp users in one process (one per calling thread) slow each other down.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from llama_cpp import Llama

from localsample.engine import ChatMessage, Engine, GenerationRequest
from localsample.runtime import Runtime

PROMPT = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle."
SYSTEM = "You are a storyteller. Write vivid prose."


@dataclass
class Sample:
    ttft: float  # seconds from the call to the first text
    decode_tps: float  # tokens after the first, over the time after the first
    tokens: int


def bench_raw(llama: Llama, max_tokens: int) -> Sample:
    llama.reset()
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}]
    started = time.perf_counter()
    first = last = 0.0
    finish = None
    for chunk in llama.create_chat_completion(
        messages=messages,  # type: ignore[arg-type]
        max_tokens=max_tokens,
        temperature=0.0,
        top_k=40,
        top_p=0.95,
        min_p=0.05,
        repeat_penalty=1.0,
        stream=True,
    ):
        choice = chunk["choices"][0]  # type: ignore[index]
        if choice["delta"].get("content"):
            last = time.perf_counter()
            first = first or last
        finish = choice.get("finish_reason") or finish
    if finish != "length":
        raise SystemExit(f"raw run ended with {finish!r} before {max_tokens} tokens: use a longer prompt")
    return Sample(first - started, (max_tokens - 1) / (last - first), max_tokens)


def bench_engine(engine: Engine, max_tokens: int) -> Sample:
    engine.load().reset()
    request = GenerationRequest(
        messages=[ChatMessage("user", PROMPT)],
        system=SYSTEM,
        max_tokens=max_tokens,
        temperature=0.0,
        top_k=40,
        top_p=0.95,
        min_p=0.05,
        repeat_penalty=1.0,
    )
    times: list[float] = []

    async def on_text(_text: str, _tokens: int) -> None:
        times.append(time.perf_counter())

    async def run() -> Sample:
        started = time.perf_counter()
        result = await engine.generate(request, on_text)
        if result.completion_tokens != max_tokens:
            raise SystemExit(f"engine run ended with {result.stop_reason} before {max_tokens} tokens")
        return Sample(times[0] - started, (max_tokens - 1) / (times[-1] - times[0]), max_tokens)

    return asyncio.run(run())


def median(samples: list[Sample], key: Callable[[Sample], float]) -> float:
    return statistics.median(key(s) for s in samples)


def side(name: str, model_id: str, conn: Connection) -> None:
    """A benchmark side in its own process: load, then run one round per request."""
    runtime = Runtime()
    model = runtime.catalog.get(model_id)
    engine = runtime.pool.engine(model)
    if name == "raw":
        llama = Llama(
            model_path=str(engine.path), verbose=False, chat_format="chat_template.default",
            **model.load.llama_kwargs(),
        )
        run: Callable[[int], Sample] = lambda n: bench_raw(llama, n)  # noqa: E731
    else:
        asyncio.run(engine.ensure_loaded())
        run = lambda n: bench_engine(engine, n)  # noqa: E731
    run(8)  # warm up
    conn.send("ready")
    while (tokens := conn.recv()) is not None:
        conn.send(run(tokens))
    runtime.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="catalog id (default: the default model)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()

    runtime = Runtime()
    model = runtime.catalog.get(args.model or runtime.settings.default_model)
    context = multiprocessing.get_context("spawn")
    sides: dict[str, tuple[BaseProcess, Connection]] = {}
    for name in ("raw", "engine"):
        mine, theirs = context.Pipe()
        process = context.Process(target=side, args=(name, model.id, theirs), daemon=True)
        process.start()
        sides[name] = (process, mine)
        if mine.recv() != "ready":
            raise SystemExit(f"the {name} side did not start")
    runs: dict[str, list[Sample]] = {"raw": [], "engine": []}
    for _ in range(args.rounds):
        for name, (_, conn) in sides.items():
            conn.send(args.tokens)
            runs[name].append(conn.recv())
    for process, conn in sides.values():
        conn.send(None)
        process.join()

    threads = model.load.llama_kwargs()["n_threads"]
    print(f"model {model.id}, {args.tokens} tokens greedy, median of {args.rounds} alternating rounds")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, n_threads={threads}")
    print(f"{'':24}{'raw':>10}{'engine':>10}{'ratio':>8}")
    raw_tps, eng_tps = (median(runs[n], lambda s: s.decode_tps) for n in ("raw", "engine"))
    raw_ttft, eng_ttft = (median(runs[n], lambda s: s.ttft) for n in ("raw", "engine"))
    print(f"{'decode tokens/s':24}{raw_tps:>10.1f}{eng_tps:>10.1f}{eng_tps / raw_tps:>8.3f}   (target >= 0.97)")
    print(f"{'time to first token ms':24}{raw_ttft * 1e3:>10.1f}{eng_ttft * 1e3:>10.1f}{eng_ttft / raw_ttft:>8.3f}")


if __name__ == "__main__":
    main()
