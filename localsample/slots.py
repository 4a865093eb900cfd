"""What the batcher (batch.py) keeps per context, per slot and per request."""

from __future__ import annotations

import codecs
import random
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import llama_cpp

from localsample.constrained import GrammarSampler
from localsample.generation import Completion, GenerationRequest, Job, SamplerSettings, StopMatcher, StopReason

Row = tuple[int, int, int, bool]  # token, position, sequence, wants logits


class Span(Protocol):
    """An image or audio clip in a prompt (vision.py's ``MediaSpan``)."""

    positions: int
    """Positions it takes in the sequence (placeholder ids in ``Prompt.tokens``)."""
    tokens: int
    """Embeddings it decodes: the KV cells it takes."""

    def evaluate(self, ctx: llama_cpp.llama_context_p, seq: int, n_past: int, n_batch: int) -> None: ...


@dataclass
class Prompt:
    """A request's prompt for the batcher: token ids, where a medium's positions hold
    placeholder ids (negative: no real token is), and the media by the offset they start at.
    ``close`` frees what llama.cpp holds for the media (once the request is done)."""

    tokens: list[int]
    media: Mapping[int, Span] = field(default_factory=dict)
    cells: int = -1
    """KV cells the prompt takes (``len(tokens)`` when no medium says otherwise)."""
    closer: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        if self.cells < 0:
            self.cells = len(self.tokens)

    def boundary(self, reuse: int) -> int:
        """``reuse`` cached tokens, moved back to the start of a medium it would cut."""
        for start, span in self.media.items():
            if start < reuse < start + span.positions:
                return start
        return reuse

    def until_media(self, offset: int) -> int | None:
        """How many tokens from ``offset`` to the next medium (None: no medium follows; the
        pending tokens may also be ones a tool-call trigger cut back, past the prompt)."""
        starts = [start for start in self.media if start >= offset]
        return min(starts) - offset if starts else None

    def extra_cells(self, upto: int) -> int:
        """KV cells beyond one a position that the media before offset ``upto`` take."""
        return sum(s.tokens - s.positions for start, s in self.media.items() if start + s.positions <= upto)

    def close(self) -> None:
        closer, self.closer = self.closer, None
        if closer is not None:
            closer()


Tokenize = Callable[[GenerationRequest], Prompt]
"""The prompt of a request (its chat template applied): runs on the engine's thread."""
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

    def context_params(self, n_batch: int, slots: int) -> llama_cpp.llama_context_params:
        """llama.cpp's parameters of the batcher's context: ``slots`` sequences in one unified
        KV cache, batches of ``n_batch`` tokens."""
        params: llama_cpp.llama_context_params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.n_ctx
        params.n_batch = n_batch
        params.n_ubatch = self.n_ubatch
        params.n_seq_max = slots
        params.n_threads = self.n_threads
        params.n_threads_batch = self.n_threads_batch
        params.kv_unified = True
        params.offload_kqv = self.offload_kqv
        if self.type_k is not None:
            params.type_k = self.type_k
        if self.type_v is not None:
            params.type_v = self.type_v
        params.flash_attn_type = self.flash_attn_type
        return params

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
    source: Prompt  # the prompt's media and KV cells
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

    def completion(self, model_id: str, reason: StopReason, stop: str | None) -> Completion:
        """The finished request: its text, counts (media tokens in the prompt's) and timings."""
        finished = time.perf_counter()
        return Completion(
            text="".join(self.parts),
            model=model_id,
            stop_reason=reason,
            stop_sequence=stop,
            prompt_tokens=self.source.cells,
            completion_tokens=self.count,
            time_to_first_token=(self.first_token_at or finished) - self.started,
            duration=finished - self.started,
        )


@dataclass
class Slot:
    seq: int
    tokens: list[int] = field(default_factory=list)  # what this sequence's KV cache holds
    active: Active | None = None
    last_used: float = 0.0
    extra_cells: int = 0  # cells its media take beyond their positions (M-RoPE images)

    @property
    def cells(self) -> int:
        """KV cells the sequence holds."""
        return len(self.tokens) + self.extra_cells


def sampler_chain(s: SamplerSettings, n_vocab: int) -> llama_cpp.llama_sampler_p:
    """A request's sampler chain in llama-cpp-python's order, so results match its generate()."""
    chain: llama_cpp.llama_sampler_p = llama_cpp.llama_sampler_chain_init(
        llama_cpp.llama_sampler_chain_default_params()
    )
    penalties = llama_cpp.llama_sampler_init_penalties(n_vocab, 64, s.repeat_penalty, 0.0, 0.0)
    llama_cpp.llama_sampler_chain_add(chain, penalties)
    if s.temperature == 0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
    else:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_k(s.top_k))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_typical(1.0, 1))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(s.top_p, 1))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_min_p(s.min_p, 1))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(s.temperature))
        seed = s.seed if s.seed is not None else random.getrandbits(31)
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed))
    return chain
