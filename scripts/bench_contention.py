"""Decode under contention: per-token latency when other work shares the cores.

    python scripts/bench_contention.py [--rounds R] [--tokens N] [--other-python PATH]

On a desktop the host app, a browser and an IDE share the cores with llama.cpp. Its
OpenMP threads spin-wait between steps; a spinning team that loses a core to another
process can collapse (requests 40x slower were seen). This compares, each in a fresh
process (OpenMP reads its environment once, at start-up):

  default            this build (OpenMP), n_threads = all cores
  engine             localsample's engine with adaptive_threads = false (as raw)
  engine adaptive    localsample's engine as shipped: fewer threads while steps are slow
                     (threads.py); its per-token gaps are taken between the ends of
                     successive one-row llama_decode calls (its text stream coalesces
                     tokens into pieces every 50 ms, too coarse to time tokens by)
  passive            OMP_WAIT_POLICY=passive (threads sleep instead of spinning)
  spincount          GOMP_SPINCOUNT=10000 (spin briefly, then sleep)
  cores-1            n_threads = cores - 1
  no-openmp          a llama-cpp-python built with -DGGML_OPENMP=OFF (ggml's own
                     threadpool), if --other-python names that build's interpreter

under three loads: idle; one busy process per core; a second model generating at the same
time (another process of the same configuration). Each run generates N tokens greedily,
R rounds, and times every token after the first; a run that takes longer than
RUN_LIMIT seconds is cut there (a collapse) and reported with the tokens it made.
The target: p95 per-token latency under contention <= 3x idle, idle speed within 5% of
the default's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

RUN_LIMIT = 30.0
"""Seconds one worker may generate before it is cut (a collapsed team can take minutes)."""

PROMPT = "Write a long story about a lighthouse keeper and the sea."

WORKER = r"""
import json, sys, time
from llama_cpp import Llama

path, prompt, threads, tokens, rounds, limit, loop = sys.argv[1:8]
threads, tokens, rounds, limit = int(threads), int(tokens), int(rounds), float(limit)
llama = Llama(model_path=path, n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False)
messages = [{"role": "user", "content": prompt}]
gaps, cut, started = [], False, time.perf_counter()
while True:
    for _ in range(rounds):
        last = None
        stream = llama.create_chat_completion(messages=messages, max_tokens=tokens, temperature=0.0, stream=True)
        for _chunk in stream:
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last = now
            if now - started > limit and loop == "once":
                cut = True
                break
        llama.reset()
        if cut:
            break
    if loop == "once":
        break
print(json.dumps({"gaps": gaps, "cut": cut}))
"""

ENGINE_WORKER = r"""
import asyncio, json, sys, time
import llama_cpp
from localsample.catalog import load_catalog
from localsample.engine import Engine
from localsample.generation import ChatMessage, GenerationRequest
from localsample.settings import load_settings
from pathlib import Path

path, prompt, threads, tokens, rounds, limit, loop = sys.argv[1:8]
threads, tokens, rounds, limit = int(threads), int(tokens), int(rounds), float(limit)
adaptive = sys.argv[8] == "adaptive"
settings = load_settings()
entry = load_catalog(settings.catalog_path).get(settings.default_model)
load = entry.load.model_copy(update={"n_ctx": 1024, "n_threads": threads, "n_threads_batch": threads,
                                     "adaptive_threads": adaptive})
engine = Engine(entry.model_copy(update={"load": load}), Path(path), slots=1)
request = GenerationRequest(messages=[ChatMessage("user", prompt)], max_tokens=tokens, temperature=0.0)
ends, gaps, started = [], [], time.perf_counter()
decode = llama_cpp.llama_decode

def timed_decode(ctx, batch):
    status = decode(ctx, batch)
    if batch.n_tokens == 1:  # a decode step of the one request (prompt chunks are longer)
        ends.append(time.perf_counter())
    return status

llama_cpp.llama_decode = timed_decode

async def main():
    while True:
        for _ in range(rounds):
            await engine.reset_cache()
            ends.clear()
            task = asyncio.ensure_future(engine.generate(request))
            done, _ = await asyncio.wait([task], timeout=max(0.1, limit - (time.perf_counter() - started)))
            gaps.extend(b - a for a, b in zip(ends, ends[1:]))
            if not done and loop == "once":
                task.cancel()
                return True
        if loop == "once":
            return False

cut = asyncio.run(main())
print(json.dumps({"gaps": gaps, "cut": cut}))
"""


@dataclass
class Config:
    name: str
    env: dict[str, str] = field(default_factory=dict)
    threads: int = 0  # 0: all cores
    python: str = sys.executable
    engine: str = ""  # "", or localsample's engine "fixed" / "adaptive"


@dataclass
class Result:
    gaps: list[float]
    cut: bool

    def p(self, q: float) -> float:
        if not self.gaps:
            return float("inf")
        ordered = sorted(self.gaps)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def tokens_per_second(self) -> float:
        return len(self.gaps) / sum(self.gaps) if self.gaps else 0.0


def run_worker(config: Config, model: Path, tokens: int, rounds: int, *, loop: bool = False) -> subprocess.Popen[str]:
    threads = config.threads or (os.cpu_count() or 1)
    code = ENGINE_WORKER if config.engine else WORKER
    args = [config.python, "-c", code, str(model), PROMPT, str(threads), str(tokens), str(rounds), str(RUN_LIMIT)]
    args += ["loop" if loop else "once", config.engine]
    env = os.environ | config.env
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)


def measure(config: Config, model: Path, tokens: int, rounds: int, load: str) -> Result:
    competitors: list[subprocess.Popen[str]] = []
    try:
        if load == "busy":
            for _ in range(os.cpu_count() or 1):
                spin = [sys.executable, "-c", "while True: pass"]
                competitors.append(subprocess.Popen(spin, stdout=subprocess.DEVNULL, text=True))
        elif load == "second model":
            competitors.append(run_worker(config, model, tokens, 1000, loop=True))
            time.sleep(2.0)  # let it load and start generating
        worker = run_worker(config, model, tokens, rounds)
        out, _ = worker.communicate(timeout=RUN_LIMIT + 60)
    finally:
        for process in competitors:
            process.kill()
            process.wait()
    data = json.loads(out or '{"gaps": [], "cut": true}')
    return Result(data["gaps"], data["cut"])


def cell(result: Result) -> str:
    """p50/p95 in ms, and 'cut' when the run passed RUN_LIMIT."""
    return f"{result.p(0.5) * 1e3:>13.1f}/{result.p(0.95) * 1e3:<8.1f}{'cut' if result.cut else '':>4}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--other-python", help="interpreter of a llama-cpp-python built with -DGGML_OPENMP=OFF")
    parser.add_argument("--model", type=Path, default=None, help="GGUF (default: the default model's file)")
    parser.add_argument("--only", default="", help="comma list of configurations to run (default: all)")
    args = parser.parse_args()
    if args.model is None:
        from localsample.catalog import load_catalog, resolve_model_path
        from localsample.settings import load_settings

        settings = load_settings()
        entry = load_catalog(settings.catalog_path).get(settings.default_model)
        args.model = resolve_model_path(entry, settings.model_dir)
    cores = os.cpu_count() or 1
    configs = [
        Config("default"),
        Config("passive", {"OMP_WAIT_POLICY": "passive"}),
        Config("spincount", {"GOMP_SPINCOUNT": "10000"}),
        Config("cores-1", threads=max(1, cores - 1)),
        Config("engine", engine="fixed"),
        Config("engine adaptive", engine="adaptive"),
    ]
    if args.other_python:
        configs.append(Config("no-openmp", python=args.other_python))
    if args.only:
        configs = [c for c in configs if c.name in args.only.split(",")]
    loads = ["idle", "busy", "second model"]
    print(f"decode under contention: {args.model.name}, {args.tokens} tokens x {args.rounds} rounds, {cores} cores")
    print(
        f"{'config':16}{'threads':>8}"
        + "".join(f"{load + ' p50/p95 ms':>26}" for load in loads)
        + "  worst/idle  idle tok/s"
    )
    baseline = None
    for config in configs:
        results = {load: measure(config, args.model, args.tokens, args.rounds, load) for load in loads}
        idle = results["idle"]
        baseline = baseline or idle.tokens_per_second
        worst = max(results[load].p(0.95) for load in loads[1:]) / idle.p(0.95)
        cells = "".join(cell(results[load]) for load in loads)
        speed = f"{idle.tokens_per_second:.1f} ({idle.tokens_per_second / baseline:.2f}x)"
        print(f"{config.name:16}{config.threads or cores:>8}{cells}{worst:>12.1f}  {speed}")
    print("  worst/idle: the p95 under the worse load over the idle p95 (target <= 3)")
    print("  cut: the run passed", f"{RUN_LIMIT:g} s and was stopped there (the team collapsed)")


if __name__ == "__main__":
    main()
