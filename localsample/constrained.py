"""Grammar-constrained sampling for one request, at close to the speed of free sampling.

Putting llama.cpp's grammar sampler first in a chain checks every token of the
vocabulary against the grammar at every step: about 12 ms a token on a 49k-token
vocabulary, as long as a whole decode step of a 135M model. Instead the grammar checks
only the ``SHORTLIST`` tokens with the highest logits, and the request's own chain
(penalties, top-k, temperature …) picks among those it allows; only when it allows none
of them (say, the end of the answer is all that is left) does the grammar filter the
whole vocabulary. For greedy decoding without a repeat penalty that is exactly the token
the grammar-first chain picks; for sampling, tokens below the shortlist's logits are left out, as top_k = 40 and
min_p leave them out anyway.
"""

from __future__ import annotations

import ctypes

import llama_cpp
import numpy as np
import numpy.typing as npt

from localsample.errors import EngineError, ToolCallError

SHORTLIST = 64
"""Tokens with the highest logits that the grammar checks first."""

TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)
"""llama.cpp's ``llama_token_data``, as a numpy record."""


class GrammarSampler:
    """A compiled grammar and the buffers to sample one request under it (engine thread)."""

    def __init__(self, vocab: llama_cpp.llama_vocab_p, n_vocab: int, grammar: str) -> None:
        sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
        if not sampler:
            raise EngineError(
                f"llama.cpp rejected the grammar built for this request ({len(grammar)} characters)",
                "simplify the tools' inputSchema or the response schema; "
                "llama.cpp's reason is in the log at debug level (LOCALSAMPLE_LOG_LEVEL=debug)",
            )
        self.sampler: llama_cpp.llama_sampler_p | None = sampler
        self.n_vocab = n_vocab
        self.ids = np.arange(n_vocab, dtype=np.int32)
        self.candidates: npt.NDArray[np.void] = np.zeros(n_vocab, dtype=TOKEN_DATA)
        self.shortlist: npt.NDArray[np.void] = np.zeros(min(SHORTLIST, n_vocab), dtype=TOKEN_DATA)
        self.all_view = self._array(self.candidates)
        self.short_view = self._array(self.shortlist)
        self.steps = 0  # tokens sampled (stats, tests)
        self.full_checks = 0  # steps where the shortlist held no allowed token

    @staticmethod
    def _array(buffer: npt.NDArray[np.void]) -> llama_cpp.llama_token_data_array:
        return llama_cpp.llama_token_data_array(
            data=buffer.ctypes.data_as(llama_cpp.llama_token_data_p), size=len(buffer), selected=-1, sorted=False
        )

    def sample(self, chain: llama_cpp.llama_sampler_p, ctx: llama_cpp.llama_context_p, row: int) -> int:
        """The next token of batch row ``row`` under the grammar; accepted by both samplers."""
        assert self.sampler is not None
        pointer = llama_cpp.llama_get_logits_ith(ctx, row)
        logits = np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(self.n_vocab,))
        self.steps += 1
        short = self.shortlist
        top = np.argpartition(logits, -len(short))[-len(short) :]
        short["id"] = top
        short["logit"] = logits[top]
        short["p"] = 0.0
        view = self._reset(self.short_view, len(short))
        llama_cpp.llama_sampler_apply(self.sampler, ctypes.byref(view))
        if np.isneginf(short["logit"]).all():
            self.full_checks += 1
            everything = self.candidates
            everything["id"] = self.ids
            everything["logit"] = logits
            everything["p"] = 0.0
            view = self._reset(self.all_view, self.n_vocab)
            llama_cpp.llama_sampler_apply(self.sampler, ctypes.byref(view))
            if np.isneginf(everything["logit"]).all():  # accepting any token now would abort llama.cpp
                raise ToolCallError(
                    "the grammar allows no token here: this request's schema leads to a dead end",
                    "simplify the schema (a pattern or bounds no JSON value can meet?)",
                )
            short = everything
        llama_cpp.llama_sampler_apply(chain, ctypes.byref(view))
        token = int(short[view.selected]["id"])
        if np.isneginf(short[view.selected]["logit"]):
            raise ToolCallError("the sampler chose a token the grammar forbids", "retry the request")
        llama_cpp.llama_sampler_accept(self.sampler, token)
        llama_cpp.llama_sampler_accept(chain, token)
        return token

    def allows(self, token: int) -> bool:
        """Whether the grammar lets ``token`` come next (its state is unchanged)."""
        assert self.sampler is not None
        one = self.shortlist[:1]
        one[0] = (token, 0.0, 0.0)
        view = self._array(one)
        llama_cpp.llama_sampler_apply(self.sampler, ctypes.byref(view))
        return not bool(np.isneginf(one["logit"][0]))

    def accept(self, token: int) -> None:
        """Advance the grammar past ``token`` (which it must allow: llama.cpp aborts otherwise)."""
        if not self.allows(token):
            raise ValueError(f"the grammar does not allow token {token} here")
        assert self.sampler is not None
        llama_cpp.llama_sampler_accept(self.sampler, token)

    @staticmethod
    def _reset(view: llama_cpp.llama_token_data_array, size: int) -> llama_cpp.llama_token_data_array:
        view.size, view.selected, view.sorted = size, -1, False
        return view

    def close(self) -> None:
        if self.sampler is not None:
            llama_cpp.llama_sampler_free(self.sampler)
            self.sampler = None
