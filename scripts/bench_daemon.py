"""One daemon for every host: what attaching costs and saves, side by side in one run.

    python scripts/bench_daemon.py [--rounds R] [--tokens N] [--llama-server PATH]

a. Start-up: an SDK host starts `localsample serve` and lists its tools; time until the
   first tools/list answer, attached to a running daemon vs standalone (in-process).
b. Per request: 4-token requests (prompt cached) and N-token decode, through the daemon
   (an attached client: this process, the daemon another) vs in-process (this process
   runs the model; the daemon sits idle meanwhile). Rounds alternate.
c. Batching across hosts: 4 concurrent requests from one client process vs 2 + 2 from two
   client processes: aggregate decode tokens/s.
d. Memory: a daemon and 3 attached `serve` processes vs 3 standalone `serve` processes
   (each with the model loaded): total RSS and PSS (PSS shares a page among the
   processes that map it: the memory really used).
e. The daemon's OpenAI-compatible endpoint vs llama.cpp's own `llama-server` (built from
   the llama.cpp that llama-cpp-python vendors, given with --llama-server) on the same
   model and settings: single-stream decode and 4/8-concurrent aggregate tokens/s through
   the `openai` client, streaming.

The daemon runs in its own process with its own state directory in a temporary folder;
the catalog and models are yours. Medians over R rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from pathlib import Path

import anyio
import httpx2
import openai
from mcp import Client, StdioServerParameters

from localsample.attach import AttachedRuntime, client_runtime
from localsample.catalog import load_catalog, resolve_model_path
from localsample.generation import ChatMessage, GenerationRequest
from localsample.runtime import Origin, Runtime
from localsample.settings import load_settings

PROMPT = "Write a long story about a lighthouse keeper and a storm."
SERVER = Path(__file__).parent / "bench_server.py"
TOKEN = "bench-token"


def request(tokens: int, i: int = 0) -> GenerationRequest:
    return GenerationRequest(messages=[ChatMessage("user", f"{i}: {PROMPT}")], max_tokens=tokens, temperature=0.0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Daemon:
    """`localsample daemon` in a temporary state directory (this process's env points at it)."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        os.environ["LOCALSAMPLE_STATE_DIR"] = str(root / "state")
        os.environ["LOCALSAMPLE_LOG_DIR"] = str(root / "logs")
        self.port = port
        args = ["--listen", f"127.0.0.1:{port}", "--token", TOKEN] if port else []
        self.log = (root / "daemon.log").open("wb")
        command = [sys.executable, "-m", "localsample", "daemon", *args]
        self.process = subprocess.Popen(command, stdout=self.log, stderr=self.log)
        sock = root / "state" / "run" / "daemon.sock"
        deadline = time.monotonic() + 120
        while not self.ready(sock):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the daemon did not start: see {root / 'daemon.log'}")
            time.sleep(0.1)

    @staticmethod
    def ready(sock: Path) -> bool:
        if not sock.exists():
            return False
        try:
            with httpx2.Client(transport=httpx2.HTTPTransport(uds=str(sock)), timeout=5) as http:
                models = http.get("http://localsample/localsample/status").json()["models"]
        except (httpx2.HTTPError, ValueError, KeyError):
            return False
        return bool(models)  # the default model is loaded

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=30)
        self.log.close()


def median_of(rounds: int, measure: Callable[[], float]) -> float:
    return statistics.median(measure() for _ in range(rounds))


# -- a. start-up -------------------------------------------------------------------------------


async def first_tools_list(env: dict[str, str]) -> float:
    args = ["-m", "localsample", "serve", "--server", f"{sys.executable} {SERVER}"]
    started = time.perf_counter()
    async with Client(StdioServerParameters(command=sys.executable, args=args, env=env)) as client:
        await client.list_tools()
        return time.perf_counter() - started


def startup_section(rounds: int) -> None:
    attached = dict(os.environ)
    alone = attached | {"LOCALSAMPLE_DAEMON": "never"}
    times = {"attached": [], "standalone": []}  # type: dict[str, list[float]]
    for _ in range(rounds):
        for name, env in (("attached", attached), ("standalone", alone)):
            times[name].append(anyio.run(first_tools_list, env))
    a, s = statistics.median(times["attached"]), statistics.median(times["standalone"])
    print("\na. a host starts `serve` and lists its tools: time to the first tools/list answer")
    print(f"   attached {a * 1e3:.0f} ms, standalone {s * 1e3:.0f} ms (ratio {a / s:.2f}); target attached <= 500 ms")


# -- b. per request ------------------------------------------------------------------------------


def per_request_section(rounds: int, tokens: int) -> None:
    settings = load_settings()
    attached = client_runtime(settings, "bench")
    assert isinstance(attached, AttachedRuntime), "no daemon to attach to"
    alone = Runtime(settings.model_copy(update={"daemon": "never"}))
    sides: dict[str, Runtime] = {"in-process": alone, "attached": attached}

    async def timed(runtime: Runtime, n: int) -> tuple[float, float]:
        started = time.perf_counter()
        answer = await runtime.answer(request(n), Origin("bench", "b"))
        return time.perf_counter() - started, answer.completion.decode_tokens_per_second

    async def run() -> dict[str, dict[str, list[float]]]:
        out = {name: {"short": [], "tps": []} for name in sides}  # type: dict[str, dict[str, list[float]]]
        for runtime in sides.values():  # warm: loaded, prompt cached
            await timed(runtime, 4)
        for _ in range(max(rounds, 30)):
            for name, runtime in sides.items():
                out[name]["short"].append((await timed(runtime, 4))[0])
        for _ in range(rounds):
            for name, runtime in sides.items():
                out[name]["tps"].append((await timed(runtime, tokens))[1])
        return out

    out = anyio.run(run)
    alone.close()
    short = {name: statistics.median(v["short"]) for name, v in out.items()}
    tps = {name: statistics.median(v["tps"]) for name, v in out.items()}
    print("\nb. one request: through the daemon (attached) vs in-process")
    print(f"{'':24}{'in-process':>12}{'attached':>10}{'added/ratio':>13}")
    added = (short["attached"] - short["in-process"]) * 1e3
    print(f"{'4-token request ms':24}{short['in-process'] * 1e3:>12.1f}{short['attached'] * 1e3:>10.1f}{added:>13.1f}")
    ratio = tps["attached"] / tps["in-process"]
    print(f"{f'{tokens}-token decode tok/s':24}{tps['in-process']:>12.1f}{tps['attached']:>10.1f}{ratio:>13.3f}")
    print("   targets: added <= 5 ms; decode ratio >= 0.97")


# -- c. two hosts --------------------------------------------------------------------------------


def host_process(requests: int, tokens: int, pipe: Connection) -> None:
    """A client process: attach, wait for "go", send ``requests`` at once, report tokens."""
    runtime = client_runtime(load_settings(), "bench-host")

    async def run() -> int:
        await runtime.answer(request(2), Origin("bench", "warm"))
        pipe.send("ready")
        pipe.recv()
        counts: list[int] = []

        async def one(i: int) -> None:
            counts.append(
                (await runtime.answer(request(tokens, i), Origin("bench", str(i)))).completion.completion_tokens
            )

        async with anyio.create_task_group() as group:
            for i in range(requests):
                group.start_soon(one, i)
        return sum(counts)

    pipe.send(anyio.run(run))


def hosts_rate(split: list[int], tokens: int) -> float:
    context = multiprocessing.get_context("spawn")
    pipes, processes = [], []
    for n in split:
        mine, theirs = context.Pipe()
        process = context.Process(target=host_process, args=(n, tokens, theirs))
        process.start()
        pipes.append(mine)
        processes.append(process)
    for pipe in pipes:
        assert pipe.recv() == "ready"
    started = time.perf_counter()
    for pipe in pipes:
        pipe.send("go")
    total = sum(int(pipe.recv()) for pipe in pipes)
    seconds = time.perf_counter() - started
    for process in processes:
        process.join()
    return total / seconds


def hosts_section(rounds: int, tokens: int) -> None:
    one = [hosts_rate([4], tokens) for _ in range(rounds)]
    two = [hosts_rate([2, 2], tokens) for _ in range(rounds)]
    o, t = statistics.median(one), statistics.median(two)
    print(f"\nc. 4 concurrent {tokens}-token requests: aggregate tokens/s (request to last token)")
    print(f"   one host {o:.1f}, two hosts (2 + 2) {t:.1f}: ratio {t / o:.3f} (target within 10% of 1)")


# -- d. memory -------------------------------------------------------------------------------------


def memory_of(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process in bytes."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss"):
            values[key] = int(rest.split()[0]) * 1024
    return values["Rss"], values["Pss"]


def serve_pids() -> list[int]:
    """This process's children that run `localsample serve`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and b"serve" in cmdline and b"localsample" in cmdline:
            found.append(int(stat.parent.name))
    return found


async def three_serves(env: dict[str, str], loaded: Callable[[int], Awaitable[None]]) -> tuple[int, int]:
    args = ["-m", "localsample", "serve", "--server", f"{sys.executable} {SERVER}"]
    params = StdioServerParameters(command=sys.executable, args=args, env=env)
    async with Client(params) as a, Client(params) as b, Client(params) as c:
        for client in (a, b, c):
            await client.list_tools()
        pids = serve_pids()
        for pid in pids:
            await loaded(pid)
        sizes = [memory_of(pid) for pid in pids]
    return sum(s[0] for s in sizes), sum(s[1] for s in sizes)


def memory_section(daemon_pid: int, state: Path) -> None:
    async def has_model(pid: int) -> None:
        status = state / "run" / f"{pid}.json"
        with anyio.fail_after(120):
            while not (status.exists() and json.loads(status.read_text())["models"]):
                await anyio.sleep(0.1)

    async def nothing(pid: int) -> None:
        return None

    alone = anyio.run(three_serves, dict(os.environ) | {"LOCALSAMPLE_DAEMON": "never"}, has_model)
    serves = anyio.run(three_serves, dict(os.environ), nothing)
    daemon = memory_of(daemon_pid)
    together = (serves[0] + daemon[0], serves[1] + daemon[1])
    mb = 1 << 20
    print("\nd. memory: 3 standalone serves vs a daemon and 3 attached serves (the model loaded)")
    print(f"{'':22}{'RSS MB':>9}{'PSS MB':>9}")
    print(f"{'3 standalone':22}{alone[0] / mb:>9.0f}{alone[1] / mb:>9.0f}")
    print(f"{'daemon + 3 attached':22}{together[0] / mb:>9.0f}{together[1] / mb:>9.0f}")
    print(f"{'  of which the daemon':22}{daemon[0] / mb:>9.0f}{daemon[1] / mb:>9.0f}")
    print(
        f"   daemon + 3 attached / one standalone: RSS {together[0] / (alone[0] / 3):.2f}, "
        f"PSS {together[1] / (alone[1] / 3):.2f} (target <= 1.3)"
    )


# -- e. the endpoint vs llama-server ------------------------------------------------------------------


async def stream_rate(client: openai.AsyncOpenAI, model: str, tokens: int, i: int) -> tuple[int, float, float]:
    """(tokens, seconds from the request to the last chunk, seconds of decode after the first)."""
    started = time.perf_counter()
    first = last = 0.0
    count = 0
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"{i}: {PROMPT}"}],
        max_tokens=tokens,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or now
            last = now
        if chunk.usage is not None:
            count = chunk.usage.completion_tokens
    return count, last - started, last - first


async def endpoint_rates(base_url: str, model: str, tokens: int, rounds: int) -> dict[int, float]:
    rates: dict[int, float] = {}
    async with openai.AsyncOpenAI(base_url=base_url, api_key=TOKEN, max_retries=0, timeout=300) as client:
        await stream_rate(client, model, 4, 0)
        for n in (1, 4, 8):
            samples = []
            for _ in range(rounds):
                started = time.perf_counter()
                results = await asyncio.gather(*(stream_rate(client, model, tokens, i) for i in range(n)))
                if n == 1:
                    count, _, decode = results[0]
                    samples.append((count - 1) / decode)
                else:
                    samples.append(sum(r[0] for r in results) / (time.perf_counter() - started))
            rates[n] = statistics.median(samples)
    return rates


def llama_server_section(binary: Path, daemon: Daemon, rounds: int, tokens: int) -> None:
    settings = load_settings()
    model = load_catalog(settings.catalog_path).get(settings.default_model)
    load = model.load
    port = free_port()
    gguf = resolve_model_path(model, settings.model_dir)
    command = [
        str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "--api-key", TOKEN,
        "-c", str(load.n_ctx), "-np", str(settings.parallel), "-t", str(load.llama_kwargs()["n_threads"]),
        "--kv-unified", "-fa", "on" if load.flash_attn else "off", "--no-webui",
    ]  # fmt: skip
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(command, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx2.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                        break
                except httpx2.HTTPError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise SystemExit("llama-server did not start:\n" + log.read().decode(errors="replace")[-2000:])
                time.sleep(0.2)
            theirs = anyio.run(endpoint_rates, f"http://127.0.0.1:{port}/v1", model.id, tokens, rounds)
            ours = anyio.run(endpoint_rates, f"http://127.0.0.1:{daemon.port}/v1", model.id, tokens, rounds)
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"\ne. OpenAI endpoint, {tokens} tokens streamed: localsample daemon vs llama-server (same llama.cpp)")
    print(f"{'':28}{'llama-server':>13}{'localsample':>12}{'ratio':>7}")
    for n, label in (
        (1, "1 stream, decode tok/s"),
        (4, "4 at once, aggregate tok/s"),
        (8, "8 at once, aggregate tok/s"),
    ):
        print(f"{label:28}{theirs[n]:>13.1f}{ours[n]:>12.1f}{ours[n] / theirs[n]:>7.3f}")
    print("   target: ratio >= 0.95 on each")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--sections", default="a,b,c,d,e", help="comma list of a, b, c, d, e")
    parser.add_argument("--llama-server", type=Path, default=None, help="a llama-server binary (section e)")
    args = parser.parse_args()
    chosen = set(args.sections.split(","))
    root = Path(tempfile.mkdtemp(prefix="lsb-"))
    port = free_port() if "e" in chosen else None
    daemon = Daemon(root, port)
    print(f"daemon pid {daemon.process.pid}; {os.cpu_count()} cores; median of {args.rounds} rounds")
    try:
        if "a" in chosen:
            startup_section(args.rounds)
        if "b" in chosen:
            per_request_section(args.rounds, args.tokens)
        if "c" in chosen:
            hosts_section(args.rounds, args.tokens)
        if "d" in chosen:
            memory_section(daemon.process.pid, root / "state")
        if "e" in chosen:
            if args.llama_server is None:
                print("\ne. skipped: give --llama-server PATH (build: see README, 'Benchmarks')")
            else:
                llama_server_section(args.llama_server, daemon, args.rounds, args.tokens)
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
