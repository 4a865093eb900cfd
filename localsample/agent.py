"""`run`: a local model that does a task with the tools of MCP servers.

The loop: the model (one catalog model for the whole conversation: ``--model``, else the
one selection picks for a request that offers tools) answers or calls tools; the calls
run on their servers (``Toolbox``: approval, timeout, errors as results); the results go
back into the conversation; until the model answers without a call, or ``max_steps``
model turns have run. Every model turn goes through ``Runtime.answer`` as server ``run``
(so ``[servers.run]`` settings, limits and the audit trail apply, origin ``run``), and
the conversation is kept within the model's context (``Conversation.fit``).

``tool_choice = "required"`` makes the first turn of each task call a tool, then resets to
``auto`` so the loop can end: small models that would not call a tool by themselves
still do the step the task needs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from localsample.conversation import Conversation, tools_tokens, truncated_result
from localsample.errors import ContextOverflowError, ToolCallError, UnknownModelError
from localsample.generation import ChatMessage, GenerationRequest, ToolCall, ToolChoice
from localsample.runtime import Origin, Runtime
from localsample.selection import Choice, Needs
from localsample.toolbox import VIA, AgentTool, Toolbox, ToolOutcome

log = logging.getLogger(__name__)

AGENT = "run"
"""The server name the agent's own model turns are made under (``[servers.run]``)."""
CONTEXT_MARGIN = 32
"""Tokens of the context kept free of the estimate, for the template's own tokens."""
MAX_REFITS = 8
"""Times a step drops more of the conversation after the engine says it does not fit."""

Finish = Literal["answered", "max_steps"]


class AgentView(Protocol):
    """What a front end shows of a run as it happens."""

    async def text(self, text: str, tokens: int) -> None:
        """The model's text as it streams."""

    def calling(self, tool: AgentTool | None, call: ToolCall) -> None:
        """The model called a tool (before it is approved and runs)."""

    def called(self, call: ToolCall, outcome: ToolOutcome) -> None:
        """A call finished (or was refused)."""


@dataclass(frozen=True)
class AgentOptions:
    model: str | None = None
    max_steps: int = 10
    max_tokens: int = 512
    temperature: float | None = None
    tool_choice: ToolChoice = "auto"


@dataclass
class CallRecord:
    """One tool call of a step, as the transcript shows it (``result`` as the model read
    it: cut when it was too long for the context)."""

    id: str
    name: str
    server: str | None
    arguments: dict[str, Any]
    result: str
    is_error: bool
    duration: float


@dataclass
class Step:
    """One model turn and the calls it made."""

    index: int
    text: str
    stop_reason: str
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token: float
    duration: float
    calls: list[CallRecord] = field(default_factory=list)


@dataclass
class TurnResult:
    """How one task (or chat message) ended: the model's answer, or the step limit."""

    finish: Finish
    answer: str | None
    steps: list[Step]


class Agent:
    """One conversation between a local model and the toolbox's tools."""

    def __init__(
        self,
        runtime: Runtime,
        toolbox: Toolbox,
        options: AgentOptions,
        *,
        conversation: Conversation | None = None,
        view: AgentView | None = None,
        run_id: str = "run",
    ) -> None:
        self.runtime = runtime
        self.toolbox = toolbox
        self.options = options
        self.conversation = conversation or Conversation()
        self.view = view
        self.run_id = run_id
        self.turns = 0
        self.choice = self.first_choice(options.model)
        self.conversation.model = self.choice.model.id

    def first_choice(self, model: str | None) -> Choice:
        """``model`` if named; else the model a resumed conversation used, if the catalog
        still has it; else the selection's pick."""
        if model is None and self.conversation.model is not None:
            try:
                return self.select(self.conversation.model)
            except UnknownModelError:
                log.warning(
                    "the saved conversation's model '%s' is not in the catalog: choosing another",
                    self.conversation.model,
                )
        return self.select(model)

    def select(self, model: str | None) -> Choice:
        """The model for the conversation: ``model`` if named, else the selection's pick
        for a request that offers tools (those with the ``tools`` capability first)."""
        needs = Needs(capabilities=frozenset({"tools"}) if self.toolbox.tools else frozenset())
        return self.runtime.select(model=model, needs=needs, server=AGENT)

    def use_model(self, model: str) -> None:
        """Switch the conversation to ``model`` (a catalog id or alias)."""
        self.choice = self.select(model)
        self.conversation.model = self.choice.model.id

    async def turn(self, task: str) -> TurnResult:
        """Give the model ``task`` (a user message) and loop until it answers or the step
        limit is reached."""
        self.conversation.add(ChatMessage("user", task))
        return await self.resume()

    async def resume(self) -> TurnResult:
        """Go on from the conversation as it is (its last message is the user's, or tool
        results the model has not read yet)."""
        steps: list[Step] = []
        choice: ToolChoice = self.options.tool_choice
        for index in range(1, self.options.max_steps + 1):
            step = await self._step(index, choice)
            steps.append(step)
            if not step.calls:
                return TurnResult("answered", step.text, steps)
            choice = "auto" if choice == "required" else choice
        return TurnResult("max_steps", None, steps)

    async def _step(self, index: int, tool_choice: ToolChoice) -> Step:
        self.turns += 1
        offered = self.toolbox.specs_offered() if tool_choice != "none" else []
        n_ctx = self.choice.model.load.n_ctx
        budget = n_ctx - self.options.max_tokens - tools_tokens(offered) - CONTEXT_MARGIN
        self.conversation.fit(budget)
        max_tokens, retried = self.options.max_tokens, False
        for attempt in range(MAX_REFITS + 1):
            request = GenerationRequest(
                messages=list(self.conversation.messages),
                max_tokens=max_tokens,
                system=self.conversation.system,
                temperature=self.options.temperature,
                tools=offered,
                tool_choice=tool_choice if offered else "auto",
            )
            origin = Origin(AGENT, f"{self.run_id}-{self.turns}", via=VIA)
            # A required call is all the answer is: the view shows the call, not its markup.
            shows_text = self.view is not None and request.tool_choice != "required"
            try:
                answer = await self.runtime.answer(
                    request,
                    origin,
                    choice=self.choice,
                    ask=self.toolbox.ask,  # for `approve = "ask"` in [servers.run]
                    on_text=self.view.text if shows_text and self.view else None,
                )
                break
            except ContextOverflowError:
                if attempt == MAX_REFITS or not self.conversation.fit(budget, at_least=1):
                    raise
            except ToolCallError as exc:
                # No usable call came out (maxTokens ran out inside it, or it broke a schema
                # keyword no grammar enforces): one more try with room for a longer call.
                if retried:
                    raise
                retried, max_tokens = True, max_tokens * 2
                log.warning("step %d: %s; trying once more with %d tokens", index, exc.one_line(), max_tokens)
        completion = answer.completion
        self.conversation.add(ChatMessage("assistant", completion.text, completion.tool_calls))
        step = Step(
            index,
            completion.text,
            completion.stop_reason,
            completion.prompt_tokens,
            completion.completion_tokens,
            round(completion.time_to_first_token, 4),
            round(completion.duration, 4),
        )
        # The step's results together stay within the share (each call gets its part).
        share = self.runtime.settings.tool_result_share / max(len(completion.tool_calls), 1)
        for number, call in enumerate(completion.tool_calls, 1):
            tool = self.toolbox.tools.get(call.name)
            if self.view is not None:
                self.view.calling(tool, call)
            outcome = await self.toolbox.call(call, f"{self.run_id}-{self.turns}.{number}")
            if self.view is not None:
                self.view.called(call, outcome)
            text = truncated_result(outcome.text, n_ctx, share)
            self.conversation.add(ChatMessage("tool", text, tool_call_id=call.id))
            step.calls.append(
                CallRecord(
                    call.id,
                    call.name,
                    tool.server if tool else None,
                    dict(call.arguments),
                    text,
                    outcome.is_error,
                    round(outcome.duration, 4),
                )
            )
        return step
