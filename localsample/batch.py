"""Continuous batching: concurrent requests on one model decode together.

One llama.cpp context holds several sequences ("slots") in one unified KV cache. A loop
on the engine's thread repeats a step while there is work:

1. admit waiting requests into idle slots, reusing the longest cached prefix found in
   any slot: an idle slot's own cache, or cells of another slot (running or idle),
   tagged for the new sequence too, which in a unified cache costs no compute and no
   memory. A request waits while every slot is busy, while the KV cache cannot hold its
   prompt + maxTokens beside the running ones, or while a prompt being evaluated shares
   a longer prefix with it (it then takes those cells instead of evaluating them again);
2. evaluate at most one chunk of one new prompt (the oldest), in a batch of its own;
3. decode one token for every generating request in one batch (one row each), sample
   each with its own sampler chain, stream, and finish the requests that end.

Every generating request advances one token per step, so none starves, and a new one
starts at the next step. Cancellation is checked every step and frees the slot at once.

Why each output equals its solo run (measured on CPU): with flash attention, llama.cpp's
default, a row's logits are bit-identical whatever other rows share its batch and
wherever its cells sit in the cache, and new prompts are evaluated alone, cut as in a
solo run. What does change the last bits, and so a later greedy token: a one-token
prompt chunk (never made, see MIN_PROMPT_EVAL), a prompt in one batch with other rows
(never done), and llama.cpp's other attention kernels for prompt chunks of 64+ tokens
and for a lone decode row over 512+ cells: a prompt read partly from the cache may
continue differently from the same prompt evaluated cold.

Images and audio (vision.py) are part of a request's ``Prompt``: each medium's positions
hold placeholder ids derived from its SHA-256, so prefix reuse works for media unchanged
(a reuse point inside a medium moves back to its start). A medium is evaluated as one
step, as a prompt chunk is: its embeddings are decoded into the request's own sequence,
and the other requests decode their next token after it. The first waiting request's
prompt is made once (``head``), not at every step it waits: media are costly to prepare.

Constrained requests (tool calls, JSON answers: ``Job.constraint``) sample each token
under a grammar (constrained.py) from their own row, so they batch with every other
request. A constraint with a ``trigger`` starts inactive: the model writes freely and the trigger is
watched for like a stop sequence; when it appears, the slot's cache is cut back to just
before it and the rest is decoded under the grammar, which writes the trigger again.
(llama.cpp's own lazy grammars abort the process when the token that completes the
trigger carries text the grammar rejects.)
"""

from __future__ import annotations

import codecs
import threading
import time
from collections import deque
from concurrent.futures import Executor, Future

import llama_cpp

from localsample.constrained import GrammarSampler
from localsample.errors import ContextOverflowError, EngineError, GenerationCancelled, LocalsampleError, ToolCallError
from localsample.generation import Completion, Job, StopMatcher, StopReason
from localsample.slots import (
    Active,
    ContextSettings,
    Encode,
    Piece,
    Prompt,
    Row,
    Slot,
    Span,
    Tokenize,
    common_prefix,
    sampler_chain,
)
from localsample.threads import ThreadGovernor

MIN_PROMPT_EVAL = 2
"""Prompt tokens always evaluated afresh, even when the whole prompt is cached (one is
needed for the logits, and a one-token batch runs other kernels: see the module doc)."""


MIN_REUSE = 32
"""Shared prompt tokens worth reusing a cache for (or half the prompt, if less)."""


class Batcher:
    """The scheduler over one context of ``slots`` sequences (see the module doc).

    Built from what it uses: the model and vocabulary handles, how to tokenize a request
    and spell a token, and the executor (the engine's one thread) it runs its loop on.
    Every method but ``submit`` runs on that executor.
    """

    def __init__(
        self,
        *,
        model_id: str,
        model: llama_cpp.llama_model_p,
        vocab: llama_cpp.llama_vocab_p,
        settings: ContextSettings,
        slots: int,
        executor: Executor,
        tokenize: Tokenize,
        piece: Piece,
        special_piece: Piece,
        encode: Encode,
    ) -> None:
        self.model_id = model_id
        self.executor = executor
        self.tokenize = tokenize
        self.piece = piece
        self.special_piece = special_piece  # constrained requests: the text the grammar sees
        self.encode = encode
        self.n_ctx = settings.n_ctx
        self.n_batch = max(settings.n_batch, slots)  # a step holds a row for every slot
        self.flash_attn_type = settings.flash_attn_type
        self.n_threads_batch = settings.n_threads_batch
        self.governor = ThreadGovernor(settings.n_threads) if settings.adaptive_threads else None
        ctx = llama_cpp.llama_init_from_model(model, settings.context_params(self.n_batch, slots))
        if not ctx:
            raise EngineError(f"llama.cpp could not create a context for '{model_id}'", "lower n_ctx in the catalog")
        self.ctx: llama_cpp.llama_context_p | None = ctx
        self.memory = llama_cpp.llama_get_memory(ctx)
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.vocab = vocab
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self.slots = [Slot(seq) for seq in range(slots)]
        self.waiting: deque[tuple[Job, Future[Completion]]] = deque()
        self.head: tuple[Job, Prompt] | None = None
        """The first waiting request's prompt, made once while it waits (media are costly)."""
        self.lock = threading.Lock()
        self.looping = False  # the step loop is scheduled or running on the executor
        self.widest_step = 0  # most requests decoded in one step (stats, tests)
        self.prompt_tokens_evaluated = 0  # prompt tokens computed (media tokens too), cache hits excluded
        self.tokens_generated = 0  # completion tokens produced (stats, tests)

    # -- from the event loop -----------------------------------------------------------

    def submit(self, job: Job) -> Future[Completion]:
        """Queue a request; the loop is started on the executor if it is idle."""
        future: Future[Completion] = Future()
        with self.lock:
            self.waiting.append((job, future))
            start = not self.looping
            self.looping = True
        if start:
            self.executor.submit(self._loop)
        return future

    @property
    def running(self) -> int:
        """Requests in a slot now (read from any thread: a snapshot)."""
        return sum(slot.active is not None for slot in self.slots)

    @property
    def queued(self) -> int:
        """Requests waiting for a slot (a snapshot)."""
        return len(self.waiting)

    # -- on the engine's thread ------------------------------------------------------------

    def reset_cache(self) -> None:
        """Forget every idle slot's cached prompt (the next requests evaluate theirs whole)."""
        for slot in self.slots:
            if slot.active is None:
                self._forget(slot)

    def _forget(self, slot: Slot) -> None:
        llama_cpp.llama_memory_seq_rm(self.memory, slot.seq, -1, -1)
        slot.tokens, slot.extra_cells = [], 0

    def _loop(self) -> None:
        try:
            while self._step():
                pass
        except BaseException as exc:  # fail every request rather than hang them
            error = EngineError(
                f"llama.cpp failed while generating with '{self.model_id}': {exc}",
                "retry the request; if it keeps failing, lower n_ctx or n_batch in the catalog",
            )
            for slot in self.slots:
                if slot.active is not None:
                    self._finish(slot, error=error)
                self._forget(slot)  # its record may be off now
            self._drop_head()
            with self.lock:
                waiting, self.waiting = list(self.waiting), deque()
                self.looping = False
            for _, future in waiting:
                future.set_exception(error)

    def _step(self) -> bool:
        self._admit()
        for slot in self.slots:
            active = slot.active
            if active is not None and active.job.cancel.is_set():
                self._finish(slot, error=GenerationCancelled())
        prompting = [s for s in self.slots if s.active is not None and s.active.pending]
        if prompting:
            self._eval_prompt(min(prompting, key=lambda s: s.active.started if s.active else 0.0))
        generating = [s for s in self.slots if s.active is not None and not s.active.pending]
        if generating:
            self._decode(generating)
        with self.lock:
            busy = any(s.active is not None for s in self.slots) or bool(self.waiting)
            if not busy:
                self.looping = False
            return busy

    def _reserved(self) -> int:
        return sum(s.active.source.cells + s.active.job.request.max_tokens for s in self.slots if s.active)

    def _drop_head(self) -> None:
        if self.head is not None:
            self.head[1].close()
            self.head = None

    def _prepared(self, job: Job) -> Prompt:
        """The prompt of the request at the head of the queue (made once)."""
        if self.head is None or self.head[0] is not job:
            self._drop_head()
            self.head = (job, self.tokenize(job.request))
        return self.head[1]

    def _drop_cancelled(self) -> None:
        """Fail every cancelled request still in the queue, wherever it stands in it (its
        caller is waiting to hear that it let go)."""
        with self.lock:
            if not any(job.cancel.is_set() for job, _ in self.waiting):
                return
            dropped = [(job, future) for job, future in self.waiting if job.cancel.is_set()]
            self.waiting = deque((job, future) for job, future in self.waiting if not job.cancel.is_set())
        if self.head is not None and self.head[0].cancel.is_set():
            self._drop_head()
        for _, future in dropped:
            future.set_exception(GenerationCancelled())

    def _admit(self) -> None:
        self._drop_cancelled()
        while True:
            with self.lock:
                if not self.waiting:
                    return
                job, future = self.waiting[0]
            try:
                prompt = self._prepared(job)
                if prompt.cells + job.request.max_tokens > self.n_ctx:
                    raise ContextOverflowError(
                        prompt_tokens=prompt.cells,
                        max_tokens=job.request.max_tokens,
                        n_ctx=self.n_ctx,
                        model_id=self.model_id,
                    )
            except Exception as exc:
                self._drop_head()
                with self.lock:
                    self.waiting.popleft()
                future.set_exception(exc)
                continue
            place = self._place(prompt)
            if place is None:
                return  # no idle slot, no room in the KV cache yet, or a shared prompt ahead: it waits
            self.head = None  # the slot owns the prompt now
            with self.lock:
                self.waiting.popleft()
            try:
                self._start(*place, job, future, prompt)
            except Exception as exc:  # the request is in no queue now: fail it, never lose it
                place[0].active = None
                prompt.close()
                future.set_exception(exc)

    def _place(self, given: Prompt) -> tuple[Slot, Slot, int] | None:
        """The slot for a new prompt, the slot whose cache it reuses, and how many tokens."""
        idle = [s for s in self.slots if s.active is None]
        if not idle:
            return None
        prompt, cells = given.tokens, given.cells
        needed = self._reserved()
        if needed + cells + 1 > self.n_ctx and any(s.active for s in self.slots):
            return None
        # The longest cached prefix in any slot; a few template tokens in common are not
        # worth taking over another conversation's cache, so they count as none.
        source = max(self.slots, key=lambda s: (common_prefix(s.tokens, prompt), s.active is None))
        shared = common_prefix(source.tokens, prompt)
        worth = min(MIN_REUSE, len(prompt) // 2)
        if shared < worth:
            shared = 0
        # A prompt still being evaluated shares more (parallel calls with one system
        # prompt): wait for it, then take its cells. Prompts are evaluated one at a time,
        # oldest first, so the wait costs nothing and saves evaluating the prefix again.
        for other in self.slots:
            if other.active is not None and other.active.pending:
                ahead = common_prefix(other.active.prompt, prompt)
                if ahead > shared and ahead >= worth:
                    return None
        # Its own slot if idle, else a slot with nothing cached, else the least recently used.
        slot = source if shared and source.active is None else min(idle, key=lambda s: (bool(s.tokens), s.last_used))
        # Make room in the unified KV cache: drop other idle slots' cached tokens as needed.
        held = sum(s.cells for s in idle if s is not slot)
        for other in sorted(idle, key=lambda s: s.last_used):
            if other is slot or (shared and other is source) or needed + held + cells <= self.n_ctx:
                continue
            held -= other.cells
            self._forget(other)
        return slot, source, shared

    def _start(
        self, slot: Slot, source: Slot, shared: int, job: Job, future: Future[Completion], given: Prompt
    ) -> None:
        prompt = given.tokens
        reuse = given.boundary(min(shared, max(len(prompt) - MIN_PROMPT_EVAL, 0)))
        if source is slot:
            llama_cpp.llama_memory_seq_rm(self.memory, slot.seq, reuse, -1)
        else:
            llama_cpp.llama_memory_seq_rm(self.memory, slot.seq, -1, -1)
            if reuse:  # tag the source's cells for this sequence too: no copy, no compute
                llama_cpp.llama_memory_seq_cp(self.memory, source.seq, slot.seq, 0, reuse)
        slot.tokens = prompt[:reuse]
        slot.extra_cells = given.extra_cells(reuse)
        constraint = job.constraint
        trigger = constraint.trigger if constraint is not None else None
        if constraint is None:
            matcher = StopMatcher(job.request.stop)
        elif trigger is not None:  # free text until the trigger, watched for like a stop sequence
            matcher = StopMatcher([*job.request.stop, trigger])
        else:  # a stop sequence inside the JSON would break it
            matcher = StopMatcher(())
        grammar = GrammarSampler(self.vocab, self.n_vocab, constraint.grammar) if constraint is not None else None
        job.admitted.set()
        slot.active = Active(
            job=job,
            future=future,
            prompt=prompt,
            pending=prompt[reuse:],
            source=given,
            sampler=sampler_chain(job.sampling, self.n_vocab),
            started=time.perf_counter(),
            matcher=matcher,
            piece=self.piece if constraint is None else self.special_piece,
            grammar=grammar,
            trigger=trigger,
        )

    def _fill(self, rows: list[Row]) -> None:
        batch = self.batch
        batch.n_tokens = len(rows)
        for i, (token, pos, seq, logits) in enumerate(rows):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits
        status = llama_cpp.llama_decode(self.ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")

    def _eval_prompt(self, slot: Slot) -> None:
        active = slot.active
        assert active is not None
        start = len(slot.tokens)  # the offset in the prompt of the first pending token
        span = active.source.media.get(start)
        if span is not None:
            return self._eval_media(slot, span)
        room = active.source.until_media(start)
        chunk = active.pending[: self.n_batch if room is None else min(self.n_batch, room)]
        if 0 < len(active.pending) - len(chunk) < MIN_PROMPT_EVAL < len(chunk):  # never leave a 1-token chunk
            chunk = chunk[:-MIN_PROMPT_EVAL]
        last = len(chunk) == len(active.pending)
        self._fill([(tok, start + i, slot.seq, last and i == len(chunk) - 1) for i, tok in enumerate(chunk)])
        self.prompt_tokens_evaluated += len(chunk)
        slot.tokens.extend(chunk)
        active.pending = active.pending[len(chunk) :]
        if last:
            self._take(slot, len(chunk) - 1)

    def _eval_media(self, slot: Slot, span: Span) -> None:
        """Evaluate an image or audio clip into the slot's sequence: one step, as a prompt
        chunk is (the other requests decode their next token after it)."""
        active = slot.active
        assert active is not None and self.ctx is not None
        try:
            span.evaluate(self.ctx, slot.seq, len(slot.tokens), self.n_batch)
        except LocalsampleError as exc:  # this request's failure: the others go on
            llama_cpp.llama_memory_seq_rm(self.memory, slot.seq, len(slot.tokens), -1)
            return self._finish(slot, error=exc)
        self.prompt_tokens_evaluated += span.tokens
        placed = active.prompt[len(slot.tokens) : len(slot.tokens) + span.positions]
        slot.tokens.extend(placed)
        slot.extra_cells += span.tokens - span.positions
        active.pending = active.pending[span.positions :]
        if not active.pending:  # templates always end with text (the assistant's header)
            self._finish(slot, error=EngineError("the prompt ends with a medium", "end the prompt with text"))

    def _decode(self, slots: list[Slot]) -> None:
        rows = []
        for slot in slots:
            active = slot.active
            assert active is not None and active.next_token is not None
            rows.append((active.next_token, len(slot.tokens), slot.seq, True))
            slot.tokens.append(active.next_token)
        started, cpu = time.perf_counter(), time.process_time()
        self._fill(rows)
        if self.governor is not None:
            seconds, used = time.perf_counter() - started, time.process_time() - cpu
            self._govern(self.governor.observe(len(rows), seconds, used))
        self.widest_step = max(self.widest_step, len(rows))
        for index, slot in enumerate(slots):
            self._take(slot, index)

    def _govern(self, threads: int | None) -> None:
        """Apply the governor's thread count (threads.py); prompts use no more than it."""
        if threads is not None and self.governor is not None:
            full = threads == self.governor.full
            llama_cpp.llama_set_n_threads(
                self.ctx, threads, self.n_threads_batch if full else min(threads, self.n_threads_batch)
            )

    def _take(self, slot: Slot, index: int) -> None:
        """Sample the next token of the slot's request from batch row ``index``."""
        active = slot.active
        assert active is not None
        if active.grammar is not None and active.trigger is None:
            assert self.ctx is not None
            try:
                token = active.grammar.sample(active.sampler, self.ctx, index)
            except ToolCallError as exc:  # this request's dead end: the others go on
                return self._finish(slot, error=exc)
        else:
            token = llama_cpp.llama_sampler_sample(active.sampler, self.ctx, index)
        if active.first_token_at is None:
            active.first_token_at = time.perf_counter()
        request = active.job.request
        if llama_cpp.llama_vocab_is_eog(self.vocab, token):
            return self._finish(slot, "endTurn")
        active.count += 1
        self.tokens_generated += 1
        piece = active.decoder.decode((active.piece or self.piece)(token))
        if active.trigger is not None:
            active.marks.append((len(slot.tokens), len(active.text)))
            active.text += piece
        text, stop = active.matcher.feed(piece)
        if text:
            active.parts.append(text)
            active.job.emit(text, active.count)
        if stop is not None and stop == active.trigger:
            if active.count >= request.max_tokens:  # no room left for a call: the text stands
                return self._finish(slot, "maxTokens")
            return self._constrain(slot)
        if stop is not None:
            return self._finish(slot, "stopSequence", stop)
        if active.count >= request.max_tokens:
            return self._finish(slot, "maxTokens")
        if active.job.cancel.is_set():
            return self._finish(slot, error=GenerationCancelled())
        active.next_token = token

    def _constrain(self, slot: Slot) -> None:
        """The trigger appeared: cut the cache back to just before it and decode the rest
        under the grammar (which writes the trigger again, now constrained)."""
        active = slot.active
        assert active is not None and active.trigger is not None
        start = active.text.find(active.trigger)
        offset = max(o for _, o in active.marks if o <= start)
        # the earliest token at that offset (tokens ending inside a UTF-8 character share one)
        cut = next(i for i, (_, o) in enumerate(active.marks) if o == offset)
        position = active.marks[cut][0]
        active.count -= len(active.marks) - cut  # the cut tokens are written again, counted then
        del slot.tokens[position:]
        pending = self.encode(active.text[offset:start])  # the text before the trigger in its token
        if not pending:  # nothing to evaluate: evaluate the last token again, for fresh logits
            pending = [slot.tokens.pop()]
        llama_cpp.llama_memory_seq_rm(self.memory, slot.seq, len(slot.tokens), -1)
        llama_cpp.llama_sampler_free(active.sampler)
        active.sampler = sampler_chain(active.job.sampling, self.n_vocab)  # its history held the cut tokens
        active.trigger = None
        active.pending = pending
        active.next_token = None
        active.matcher = StopMatcher(())
        active.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        active.text, active.marks = "", []

    def _finish(
        self, slot: Slot, reason: StopReason | None = None, stop: str | None = None, error: BaseException | None = None
    ) -> None:
        active = slot.active
        assert active is not None
        slot.active = None
        slot.last_used = time.monotonic()
        active.source.close()
        llama_cpp.llama_sampler_free(active.sampler)
        if active.grammar is not None:
            active.grammar.close()
        if error is not None or reason is None:
            active.future.set_exception(error or GenerationCancelled())
            return
        if stop is None:
            tail = active.matcher.flush() + active.decoder.decode(b"", final=True)
            if tail:
                active.parts.append(tail)
                active.job.emit(tail, active.count)
        active.future.set_result(active.completion(self.model_id, reason, stop))

    def close(self) -> None:
        """Free the context (call on the engine's thread, with no loop running)."""
        if self.ctx is not None:
            llama_cpp.llama_batch_free(self.batch)
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
