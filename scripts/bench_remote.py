"""What a remote engine costs through localsample, against the openai client straight to it.

    python scripts/bench_remote.py [--rounds R] [--tokens N]

Starts llama-cpp-python's own server (`python -m llama_cpp.server`, the default model,
``--interrupt_requests False`` so that concurrent requests queue) twice on loopback and
measures, in one run, alternating rounds, and prints one table:
a. 4-token requests: time through localsample (a remote catalog entry, Runtime.answer)
   minus the openai client's time straight to the same server, request after request:
   the median of these differences is the latency added.
b. N-token requests, streamed: decode tokens/s both ways, measured the same way (tokens
   after the first over the time from the first streamed piece to the last), and their ratio.
c. 40 requests (1, 2, 4 at a time) over the 2 replicas: how many each answered (least
   requests in flight: at 4 at a time, the replica that answers faster gets more); then one
   replica is killed and the request that meets it shows what failing over costs.
Each side streams; each server decodes one request at a time (its own lock).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import anyio
import httpx2
import openai

from localsample.catalog import load_catalog, resolve_model_path
from localsample.generation import ChatMessage, GenerationRequest
from localsample.remote import RemoteGenerator
from localsample.runtime import Origin, Runtime
from localsample.settings import load_settings

KEY = "bench-key"
THREADS = max(1, (os.cpu_count() or 2) // 2)
"""Each replica gets half the cores, as if on a machine of its own: replicas that fight over
cores run at different speeds, and least-requests balancing then rightly favours one."""
PROMPT = "Write a long story about a lighthouse keeper and a storm."


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(gguf: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--n_ctx", "2048", "--api_key", KEY, "--n_threads", str(THREADS)]
    command += ["--interrupt_requests", "False"]  # by default a new request cuts the streaming one
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx2.get(url + "/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200:
                return process, url
        except httpx2.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"llama_cpp.server did not start: see {log}")
        time.sleep(0.2)


async def direct(client: openai.AsyncOpenAI, tokens: int) -> tuple[float, float]:
    """(seconds, decode tokens/s) of one streamed request straight to the server."""
    started = time.perf_counter()
    first = last = 0.0
    count = 0
    stream = await client.chat.completions.create(
        model="smol",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=tokens,
        temperature=0.0,
        stream=True,
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            now = time.perf_counter()
            first, last, count = first or now, now, count + 1
    seconds = time.perf_counter() - started
    return seconds, (count - 1) / (last - first) if count > 1 and last > first else 0.0


async def through(runtime: Runtime, tokens: int) -> tuple[float, float]:
    """(seconds, decode tokens/s) of one request through localsample, timed as ``direct``."""
    request = GenerationRequest(messages=[ChatMessage("user", PROMPT)], max_tokens=tokens, temperature=0.0)
    seen: list[float] = []

    async def on_text(_text: str, _tokens: int) -> None:  # one call per streamed piece
        seen.append(time.perf_counter())

    started = time.perf_counter()
    answer = await runtime.answer(request, Origin("bench", "r"), model="remote", on_text=on_text)
    seconds = time.perf_counter() - started
    count, span = answer.completion.completion_tokens, seen[-1] - seen[0] if seen else 0.0
    return seconds, (count - 1) / span if count > 1 and span > 0 else 0.0


Row = tuple[str, str, str, str, str]


async def compare(runtime: Runtime, url: str, rounds: int, tokens: int) -> list[Row]:
    async with openai.AsyncOpenAI(base_url=url, api_key=KEY, max_retries=0) as client:
        await direct(client, 4)
        await through(runtime, 4)
        short: dict[str, list[float]] = {"direct": [], "localsample": []}
        for _ in range(max(rounds * 12, 60)):  # the server's own time varies by ms: many pairs
            short["direct"].append((await direct(client, 4))[0])
            short["localsample"].append((await through(runtime, 4))[0])
        rate: dict[str, list[float]] = {"direct": [], "localsample": []}
        for _ in range(rounds):
            rate["direct"].append((await direct(client, tokens))[1])
            rate["localsample"].append((await through(runtime, tokens))[1])
    d, s = statistics.median(short["direct"]), statistics.median(short["localsample"])
    n = len(short["direct"])
    paired = statistics.median(b - a for a, b in zip(short["direct"], short["localsample"], strict=True))
    added = f"{paired * 1e3:+.1f} ms (median of pairs)"
    rows: list[Row] = [
        (f"a. 4-token request, ms (median of {n})", f"{d * 1e3:.1f}", f"{s * 1e3:.1f}", added, "<= +5 ms")
    ]
    d, s = statistics.median(rate["direct"]), statistics.median(rate["localsample"])
    rows.append(
        (f"b. decode tok/s, {tokens} tokens (median of {rounds})", f"{d:.1f}", f"{s:.1f}", f"{s / d:.3f}", ">= 0.97")
    )
    return rows


async def balance(runtime: Runtime, at_once: int) -> Counter[str]:
    used: Counter[str] = Counter()
    limiter = anyio.Semaphore(at_once)
    request = GenerationRequest(messages=[ChatMessage("user", "Hi")], max_tokens=4, temperature=0.0)

    async def one(i: int) -> None:
        async with limiter:
            answer = await runtime.answer(request, Origin("bench", str(i)), model="remote")
            used[str(answer.completion.engine)] += 1

    async with anyio.create_task_group() as group:
        for i in range(40):
            group.start_soon(one, i)
    return used


async def timed_request(runtime: Runtime) -> float:
    request = GenerationRequest(messages=[ChatMessage("user", "Hi")], max_tokens=4, temperature=0.0)
    started = time.perf_counter()
    await runtime.answer(request, Origin("bench", "f"), model="remote")
    return time.perf_counter() - started


def failover(runtime: Runtime, processes: dict[str, subprocess.Popen[bytes]]) -> tuple[float, float, float]:
    """Seconds of: a usual request; the next request after a replica is killed (the one it
    would go to: the least used of the idle ones), which meets the dead replica first; and
    the median of 5 more sent to the dead one first (its back-off cleared each time)."""
    normal = statistics.median(anyio.run(timed_request, runtime) for _ in range(5))
    remote = runtime.pool.generator(runtime.catalog.get("remote"))
    assert isinstance(remote, RemoteGenerator)
    victim = min(remote.replicas, key=lambda r: (r.in_flight, r.sent))
    processes[victim.url].kill()
    processes[victim.url].wait()
    times = []
    for _ in range(6):
        victim.failed_until, victim.sent = 0.0, 0  # tried first (again)
        times.append(anyio.run(timed_request, runtime))
        if victim.sent != 1:
            raise SystemExit("the request did not meet the killed replica")
    return normal, times[0], statistics.median(times[1:])


def show(header: Row, rows: list[Row]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    settings = load_settings()
    model = load_catalog(settings.catalog_path).get(settings.default_model)
    gguf = resolve_model_path(model, settings.model_dir)
    root = Path(tempfile.mkdtemp(prefix="lsrb-"))
    first, url_a = start_server(gguf, root / "a.log")
    second, url_b = start_server(gguf, root / "b.log")
    try:
        catalog = root / "models.toml"
        catalog.write_text(f'[[models]]\nid = "remote"\nendpoint = "{url_a}"\napi_key_env = "BENCH_KEY"\n')
        os.environ |= {"BENCH_KEY": KEY, "LOCALSAMPLE_CATALOG_PATH": str(catalog)}
        os.environ["LOCALSAMPLE_LOG_DIR"] = str(root / "logs")
        rows = anyio.run(compare, Runtime(load_settings()), url_a, args.rounds, args.tokens)
        catalog.write_text(
            f'[[models]]\nid = "remote"\nendpoints = ["{url_a}", "{url_b}"]\napi_key_env = "BENCH_KEY"\n'
        )
        runtime = Runtime(load_settings())
        for at_once in (1, 2, 4):
            used = anyio.run(balance, runtime, at_once)
            within = "yes" if abs(used[url_a] - used[url_b]) <= 4 else "no"
            split = f"{used[url_a]} / {used[url_b]}"
            rows.append(
                (f"c. 40 requests, {at_once} at a time: replica A / B", "-", split, f"within ±2: {within}", "20 ± 2")
            )
        normal, met, again = failover(runtime, {url_a: first, url_b: second})
        cost = f"{(met - normal) * 1e3:+.1f} ms (usual {normal * 1e3:.1f})"
        rows.append(("d. failover: first request after a replica is killed, ms", "-", f"{met * 1e3:.1f}", cost, "-"))
        cost = f"{(again - normal) * 1e3:+.1f} ms"
        rows.append(("   then, sent to the dead one first (median of 5), ms", "-", f"{again * 1e3:.1f}", cost, "-"))
        print()
        show(("", "openai client, direct", "through localsample", "difference / ratio", "target"), rows)
    finally:
        for process in (first, second):
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=20)


if __name__ == "__main__":
    main()
