"""What the batcher (batch.py) keeps per context, per slot and per request."""

from __future__ import annotations

import codecs
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import llama_cpp

from localsample.constrained import GrammarSampler
from localsample.generation import Completion, GenerationRequest, Job, StopMatcher

Row = tuple[int, int, int, bool]  # token, position, sequence, wants logits
Tokenize = Callable[[GenerationRequest], list[int]]
"""The prompt tokens of a request (its chat template applied): runs on the engine's thread."""
Piece = Callable[[int], bytes]
"""The bytes of one token's text."""
Encode = Callable[[str], list[int]]
"""The tokens of a piece of text (special tokens spelled out are parsed as such)."""


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass(frozen=True)
class ContextSettings:
    """How the batcher's llama.cpp context is made (from the catalog's load settings)."""

    n_ctx: int
    n_batch: int
    n_ubatch: int
    n_threads: int
    n_threads_batch: int
    offload_kqv: bool = True
    flash_attn: bool | None = None  # None: llama.cpp's auto, on where the device has it
    type_k: int | None = None
    type_v: int | None = None
    adaptive_threads: bool = True  # fewer threads while other work takes the cores (threads.py)

    @classmethod
    def from_load(cls, load: dict[str, Any]) -> ContextSettings:
        """From ``LoadSettings.context_kwargs()``."""
        return cls(
            n_ctx=load["n_ctx"],
            n_batch=load["n_batch"],
            n_ubatch=load["n_ubatch"],
            n_threads=load["n_threads"],
            n_threads_batch=load["n_threads_batch"],
            offload_kqv=load["offload_kqv"],
            flash_attn=load.get("flash_attn"),
            type_k=load.get("type_k"),
            type_v=load.get("type_v"),
            adaptive_threads=load.get("adaptive_threads", True),
        )

    @property
    def flash_attn_type(self) -> int:
        if self.flash_attn is None:
            return llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
        return llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if self.flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED


@dataclass
class Active:
    """One request in a slot."""

    job: Job
    future: Future[Completion]
    prompt: list[int]
    pending: list[int]  # prompt tokens still to evaluate
    sampler: llama_cpp.llama_sampler_p
    started: float
    matcher: StopMatcher
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )
    parts: list[str] = field(default_factory=list)
    count: int = 0
    next_token: int | None = None
    first_token_at: float | None = None
    piece: Piece | None = None  # how this request's tokens are spelled
    grammar: GrammarSampler | None = None
    trigger: str | None = None  # while set, the grammar waits for this text to appear
    text: str = ""  # all text decoded so far (kept while a trigger is watched)
    marks: list[tuple[int, int]] = field(default_factory=list)  # (position, offset in text) per token


@dataclass
class Slot:
    seq: int
    tokens: list[int] = field(default_factory=list)  # what this sequence's KV cache holds
    active: Active | None = None
    last_used: float = 0.0
