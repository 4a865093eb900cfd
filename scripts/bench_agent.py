"""An agent task (`localsample run`): prompt tokens each step evaluates, and its speed vs raw llama-cpp-python.

    python scripts/bench_agent.py [--model ID] [--rounds R]

(also section 7 of scripts/bench.py)

`run`'s own ``Agent`` with a real ``Runtime`` and ``Toolbox`` does a task with the tools of
``examples/notes_server.py examples/notes`` over stdio (calls approved automatically, audit
off, log and state dirs in a temp dir), greedy, maxTokens 64: task -> call -> result ->
call -> result -> answer. The agent sets toolChoice "auto" after a task's first step, and
this model calls tools only when "required"; so the bench runs each step as the loop does,
with a fresh ``AgentOptions(max_steps=1)`` (``agent.turn``, then ``agent.resume``): steps
1-2 "required", step 3 "auto" (tools still offered, as the agent offers them; what the
model does then is what is measured). A step's time is its model turn, ``Runtime.answer``
(render, tokenize, schedule, decode under the grammar, parse the calls), not its tool calls.

Per step, medians over R rounds (each round starts with an empty prompt cache):
  prompt     prompt tokens of the step's request
  new        tokens added since the previous step's prompt + completion
  reuse      prompt tokens the engine evaluated (its batcher's ``prompt_tokens_evaluated``)
  target     new + MIN_PROMPT_EVAL: what reuse should cost (step 1: the whole prompt)
  cold       the same request again after ``reset_cache()``: evaluated without reuse
  out        completion tokens, ours / raw (equal when both decoded the same answer)
  ms         the model turn: ours with reuse, ours cold, raw llama-cpp-python
  raw/ours   raw time / our time: >= 0.95 means at least 95% as fast (target)
Raw llama-cpp-python runs in a process of its own (a second llama.cpp user in one process
slows both): ``Llama`` with the catalog's settings (same n_ctx), ``create_completion`` on
the prompt text our engine rendered, the same maxTokens and greedy sampling, its prefix
cache kept across steps (``reset()`` starts each round, as ours is reset). "required"
steps give it our grammar (``LlamaGrammar.from_string``, timed as our compile is; llama.cpp
samples it grammar first over the whole vocabulary); "auto" steps (ours: a grammar armed
by the call's trigger) run unconstrained: "free". Rounds alternate ours, ours cold, raw.
A step over its target gets a line saying where its prompt stops matching the cache:
inside the previous answer (the prompt renders it anew) or inside the previous prompt.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from llama_cpp import Llama
from llama_cpp.llama_grammar import LlamaGrammar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from localsample.agent import AGENT, Agent, AgentOptions
from localsample.batch import MIN_PROMPT_EVAL
from localsample.catalog import ModelEntry, resolve_model_path
from localsample.client import ServerSpec
from localsample.engine import Engine, sampler_settings
from localsample.generation import Completion, GenerationRequest, ToolChoice
from localsample.grammar import constraint_for
from localsample.runtime import Answer, Origin, Runtime
from localsample.settings import ServerSettings, load_settings
from localsample.toolbox import VIA, Toolbox
from localsample.toolcalls import render_prompt

ROOT = Path(__file__).resolve().parent.parent
TASK = "What does my note about the garden say I should plant?"
CHOICES: tuple[ToolChoice, ...] = ("required", "required", "auto")
MAX_TOKENS = 64


@dataclass
class Turn:
    """One model turn: its request and completion, its time, the prompt tokens evaluated."""

    request: GenerationRequest
    completion: Completion
    seconds: float
    evaluated: int


class TimedRuntime(Runtime):
    """The agent's runtime, timing its model turns (origin ``run``): the sampling a tool
    asks for (summarize_note) goes through here too and is left out."""

    engine: Engine | None = None
    turns: list[Turn]

    async def answer(self, request: GenerationRequest, origin: Origin, **kwargs: Any) -> Answer:
        engine = self.engine
        if origin.server != AGENT or engine is None or engine.batcher is None:
            return await super().answer(request, origin, **kwargs)
        before, started = engine.batcher.prompt_tokens_evaluated, time.perf_counter()
        answer = await super().answer(request, origin, **kwargs)
        seconds, evaluated = time.perf_counter() - started, engine.batcher.prompt_tokens_evaluated - before
        self.turns.append(Turn(request, answer.completion, seconds, evaluated))
        return answer


def options(model: str, choice: ToolChoice) -> AgentOptions:
    return AgentOptions(model=model, max_steps=1, temperature=0.0, tool_choice=choice, max_tokens=MAX_TOKENS)


async def agent_pass(runtime: TimedRuntime, toolbox: Toolbox, model: str) -> list[Turn]:
    """The task, one step at a time, from an empty prompt cache."""
    assert runtime.engine is not None
    await runtime.engine.reset_cache()
    runtime.turns = []
    agent = Agent(runtime, toolbox, options(model, CHOICES[0]), run_id="bench")
    for index, choice in enumerate(CHOICES):
        agent.options = options(model, choice)
        await (agent.turn(TASK) if index == 0 else agent.resume())
    return runtime.turns


async def cold_pass(runtime: TimedRuntime, agent_turns: list[Turn], model: str) -> list[Turn]:
    """The same requests again, each after ``reset_cache()``: no prefix reuse."""
    assert runtime.engine is not None
    runtime.turns = []
    choice = runtime.select(model=model)
    for index, turn in enumerate(agent_turns):
        await runtime.engine.reset_cache()
        await runtime.answer(turn.request, Origin(AGENT, f"cold-{index}", via=VIA), choice=choice)
    return runtime.turns


def raw_side(path: str, load: dict[str, Any], conn: Connection) -> None:
    """Raw llama-cpp-python in its own process: one pass of steps per message."""
    llama = Llama(model_path=path, verbose=False, **load)
    while (steps := conn.recv()) is not None:
        llama.reset()  # type: ignore[no-untyped-call]  # each round starts cold; steps reuse its prefix cache
        results: list[tuple[float, int, int]] = []
        for prompt, grammar_text, sampling in steps:
            started = time.perf_counter()
            grammar = LlamaGrammar.from_string(grammar_text, verbose=False) if grammar_text else None
            out = llama.create_completion(prompt, max_tokens=MAX_TOKENS, grammar=grammar, **sampling)
            usage = out["usage"]  # type: ignore[index]
            results.append((time.perf_counter() - started, usage["completion_tokens"], usage["prompt_tokens"]))
        conn.send(results)
    llama.close()


def raw_steps(engine: Engine, model: ModelEntry, turns: list[Turn]) -> list[tuple[str, str | None, dict[str, Any]]]:
    """Each turn as raw llama-cpp-python gets it: prompt text, grammar ("required" only), sampling."""
    steps = []
    for turn in turns:
        request = turn.request
        prompt = render_prompt(engine._template, request, engine.dialect, model.id)
        constraint = constraint_for(request, engine.dialect)
        grammar = constraint.grammar if constraint is not None and constraint.trigger is None else None
        s = sampler_settings(request, model)  # greedy: llama-cpp-python then uses these two alone
        steps.append((prompt, grammar, {"temperature": s.temperature, "repeat_penalty": s.repeat_penalty}))
    return steps


def did(turn: Turn) -> str:
    calls = ", ".join(f"{c.name}({json.dumps(dict(c.arguments))})" for c in turn.completion.tool_calls)
    return f"called {calls}" if calls else f"answered {' '.join(turn.completion.text.split())[:60]!r}"


async def measure(model: ModelEntry, rounds: int, conn: Connection, temp: Path) -> None:
    servers = {"notes": ServerSettings(approve_tools="auto")}
    settings = load_settings(audit=False, log_dir=temp / "log", state_dir=temp / "state", servers=servers)
    runtime = TimedRuntime(settings)
    engine = runtime.pool.generator(model)
    assert isinstance(engine, Engine)
    runtime.engine = engine
    await engine.ensure_loaded()
    spec = ServerSpec.parse(f"notes={sys.executable} examples/notes_server.py examples/notes", cwd=ROOT)
    ours: list[list[Turn]] = []
    cold: list[list[Turn]] = []
    raw: list[list[tuple[float, int, int]]] = []
    try:
        async with Toolbox(runtime, [spec]) as toolbox:
            for round_ in range(rounds + 1):  # the first round warms up
                turns = await agent_pass(runtime, toolbox, model.id)
                again = await cold_pass(runtime, turns, model.id)
                conn.send(steps := raw_steps(engine, model, turns))
                raw_round = await asyncio.to_thread(conn.recv)
                if round_:
                    ours.append(turns)
                    cold.append(again)
                    raw.append(raw_round)
    finally:
        runtime.close()
    report(model, engine, [prompt for prompt, _, _ in steps], ours, cold, raw)


def report(
    model: ModelEntry,
    engine: Engine,
    texts: list[str],
    ours: list[list[Turn]],
    cold: list[list[Turn]],
    raw: list[list[tuple[float, int, int]]],
) -> None:
    first = ours[0]
    print(
        f"\n7. agent task (`localsample run`, model {model.id}, {engine.dialect.name} dialect, median of {len(ours)})"
    )
    print(f"   task: {TASK!r}, greedy, maxTokens {MAX_TOKENS}, toolChoice per step: {', '.join(CHOICES)}")
    if len({tuple((t.completion.prompt_tokens, t.completion.completion_tokens, did(t)) for t in r) for r in ours}) > 1:
        print("   note: the conversation differed between rounds (token counts are round 1's)")
    head = f"{'step':>4} {'choice':9}{'prompt':>7}{'new':>5}{'reuse':>6}{'target':>7}{'cold':>6}{'out':>8}"
    print(f"{head}{'ms ours':>9}{'cold':>7}{'raw':>7}{'raw/ours':>9}  raw peer")
    totals = [0.0, 0.0, 0.0]
    notes = []
    for index, turn in enumerate(first):
        prompt, previous = turn.completion.prompt_tokens, first[index - 1].completion if index else None
        new = prompt - (previous.prompt_tokens + previous.completion_tokens) if previous else prompt
        target = new + MIN_PROMPT_EVAL if previous else prompt
        times = [statistics.median(r[index].seconds for r in ours), statistics.median(r[index].seconds for r in cold)]
        times.append(statistics.median(r[index][0] for r in raw))
        totals = [a + b * 1e3 for a, b in zip(totals, times, strict=True)]
        ms, cold_ms, raw_ms = (t * 1e3 for t in times)
        raw_out, raw_prompt = raw[0][index][1], raw[0][index][2]
        peer = "grammar" if turn.request.tool_choice == "required" else "free"
        peer += "" if raw_prompt == prompt else f" (its prompt: {raw_prompt} tokens)"
        out = f"{turn.completion.completion_tokens}/{raw_out}"
        print(
            f"{index + 1:>4} {turn.request.tool_choice:9}{prompt:>7}{new:>5}{turn.evaluated:>6}{target:>7}"
            f"{cold[0][index].evaluated:>6}{out:>8}{ms:>9.0f}{cold_ms:>7.0f}{raw_ms:>7.0f}{raw_ms / ms:>9.3f}  {peer}"
        )
        if previous and turn.evaluated > target:
            over = f"{turn.evaluated - target} tokens over target; the cache stops matching"
            notes.append(f"   step {index + 1}: {over} {diverges(texts, index)}")
    ms, cold_ms, raw_ms = totals
    print(f"{'all':>4}{'':49}{ms:>9.0f}{cold_ms:>7.0f}{raw_ms:>7.0f}{raw_ms / ms:>9.3f}  (target >= 0.95)")
    print("   reuse: prompt tokens evaluated with the prefix cache (target: new + MIN_PROMPT_EVAL); cold: without;")
    print("   out: completion tokens ours/raw; free: raw decodes unconstrained (ours arms the call grammar)")
    for index, turn in enumerate(first):
        print(f"   step {index + 1} {did(turn)}")
    print("\n".join(notes))


def diverges(texts: list[str], index: int) -> str:
    """Where step ``index``'s prompt stops matching what the cache holds from the step before."""
    before, now = texts[index - 1], texts[index]
    at = next((i for i, (a, b) in enumerate(zip(before, now, strict=False)) if a != b), min(len(before), len(now)))
    if at == len(before):
        return f"inside step {index}'s answer: the prompt holds it as the template renders it, not the tokens written"
    return f"inside step {index}'s prompt, which changed: {before[at - 40 : at + 30]!r} -> {now[at : at + 30]!r}"


def agent_section(model: ModelEntry, rounds: int = 3) -> None:
    path = resolve_model_path(model, load_settings().model_dir)
    context = multiprocessing.get_context("spawn")
    mine, theirs = context.Pipe()
    process = context.Process(target=raw_side, args=(str(path), model.load.llama_kwargs(), theirs), daemon=True)
    process.start()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-agent-") as temp:
            asyncio.run(measure(model, rounds, mine, Path(temp)))
    finally:
        mine.send(None)
        process.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="catalog id (default: the default model)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    runtime = Runtime()
    agent_section(runtime.catalog.get(args.model or runtime.settings.default_model), args.rounds)


if __name__ == "__main__":
    main()
