"""A model's multimodal projector (mmproj): images and audio into the batcher's context.

llama.cpp's multimodal library (mtmd) turns a prompt with media markers and the media
themselves into chunks: runs of text tokens, and image or audio chunks that its projector
encodes into embeddings. ``Projector.tokenize`` makes a batcher ``Prompt`` of them: text
tokens as they are, and each medium as one ``MediaSpan`` whose positions hold placeholder
ids derived from the medium's SHA-256. The placeholders make the batcher's prefix cache
work for media unchanged: a second question about the same screenshot shares the prefix
up to and past the image, so neither its encoding nor its evaluation is repeated.

``MediaSpan.evaluate`` runs on the engine's thread, as one step of the batcher: it encodes
the medium (or takes its embeddings from a small cache keyed by the digest, for the same
image at another place in another conversation) and decodes the embeddings into the
request's own sequence of the shared context, so media requests batch with text ones.

Everything here needs llama-cpp-python built with its multimodal library (``doctor``
says whether it is); it is imported only when a request carries media.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from localsample.errors import EngineError, ModelFileError, RequestError
from localsample.generation import MEDIA_MARKER, Media
from localsample.media import rgb_pixels
from localsample.slots import Prompt

log = logging.getLogger(__name__)

EMBEDDING_CACHE_BYTES = 64 << 20
"""Embeddings of recent media kept per projector (64 MiB: ~30 images of a 2B model)."""


def multimodal_library() -> Any:
    """llama-cpp-python's bindings of mtmd; EngineError naming the fix when the installed
    build has no multimodal library."""
    try:
        from llama_cpp import mtmd_cpp
    except (ImportError, OSError, RuntimeError, FileNotFoundError) as exc:
        raise EngineError(
            f"this llama-cpp-python has no multimodal library ({exc})",
            "reinstall it with the library: scripts/setup.sh does (CMAKE_ARGS without -DLLAVA_BUILD=OFF), or "
            "pip install --force-reinstall --no-cache-dir llama-cpp-python",
        ) from None
    return mtmd_cpp


def placeholder_base(key: str) -> int:
    """The first placeholder id of a medium's chunk: negative (no real token is), and
    distinct for distinct keys (56 bits of a hash, room for 2**20 positions each)."""
    return -((int(hashlib.sha256(key.encode()).hexdigest()[:14], 16) << 20) + 1)


class MediaSpan:
    """One chunk of an image or audio clip in a prompt (most media are one chunk; tiled
    images and audio over 30 s are several): the positions it takes, and how to put it into
    a sequence of the context. ``key`` (the medium's digest and the chunk's index in it)
    names its embeddings in the cache and its placeholder ids."""

    def __init__(self, projector: Projector, chunk: Any, medium: Media, part: int) -> None:
        mtmd = projector.mtmd
        self.projector = projector
        self.chunk = chunk
        self.medium = medium
        self.key = f"{medium.digest}:{part}"
        self.positions = int(mtmd.mtmd_input_chunk_get_n_pos(chunk))
        self.tokens = int(mtmd.mtmd_input_chunk_get_n_tokens(chunk))
        """Embeddings it decodes (KV cells it takes); more than ``positions`` with M-RoPE."""
        self.non_causal = bool(mtmd.mtmd_decode_use_non_causal(projector.ctx, chunk))
        """Decoded with non-causal attention (Gemma 3): then in one micro-batch."""

    def placeholders(self) -> list[int]:
        base = placeholder_base(self.key)
        return [base - i for i in range(self.positions)]

    def evaluate(self, ctx: llama_cpp.llama_context_p, seq: int, n_past: int, n_batch: int) -> None:
        """Decode the medium's embeddings into ``seq`` at ``n_past`` (engine thread)."""
        self.projector.decode(self, ctx, seq, n_past, n_batch)


@dataclass
class Stats:
    encoded: int = 0
    """Media the projector encoded (cache misses)."""
    reused: int = 0
    """Media whose embeddings came from the cache."""
    evaluated: int = 0
    """Media tokens decoded into a sequence (a prefix-cache hit decodes none)."""
    encode_seconds: float = 0.0


class Projector:
    """An mmproj loaded beside its text model (on the engine's thread, when the first
    request with media comes)."""

    def __init__(
        self, path: Path, model: llama_cpp.llama_model_p, *, model_id: str, threads: int, gpu: bool, n_ubatch: int
    ) -> None:
        mtmd = multimodal_library()
        if not path.is_file():
            raise ModelFileError(
                f"model '{model_id}': its projector {path} is not on disk",
                f"download it with `localsample models pull {model_id}`, or correct mmproj in the catalog",
            )
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = gpu
        params.n_threads = threads
        params.print_timings = False
        self.marker = MEDIA_MARKER.encode()  # kept alive: llama.cpp holds the pointer
        params.media_marker = self.marker
        started = time.perf_counter()
        ctx = mtmd.mtmd_init_from_file(str(path).encode(), model, params)
        if not ctx:
            raise ModelFileError(
                f"llama.cpp could not load the projector {path} of model '{model_id}' (see the log above)",
                "check that this mmproj belongs to the model (same family and size), or download it again",
            )
        self.mtmd, self.ctx, self.path, self.model_id, self.n_ubatch = mtmd, ctx, path, model_id, n_ubatch
        self.vision = bool(mtmd.mtmd_support_vision(ctx))
        self.audio = bool(mtmd.mtmd_support_audio(ctx))
        self.n_embd = int(llama_cpp.llama_model_n_embd_inp(model))
        self.cache: OrderedDict[str, np.ndarray[Any, np.dtype[np.float32]]] = OrderedDict()
        self.cache_bytes = 0
        self.stats = Stats()
        log.info(
            "loaded projector %s for %s in %.2fs (%s)",
            path.name,
            model_id,
            time.perf_counter() - started,
            "/".join(k for k, on in (("vision", self.vision), ("audio", self.audio)) if on) or "nothing",
        )

    def check(self, media: list[Media]) -> None:
        """RequestError when the projector cannot read a kind of medium the request sends."""
        for kind, can in (("image", self.vision), ("audio", self.audio)):
            if not can and any(m.kind == kind for m in media):
                capability = "vision" if kind == "image" else "audio"
                raise RequestError(
                    f"model '{self.model_id}': its projector {self.path.name} reads no {kind} "
                    f"(the catalog says {capability}; the file does not)",
                    f"remove {capability} from the entry's capabilities, or use a model whose projector reads {kind}",
                )

    def tokenize(self, text: str, media: list[Media]) -> Prompt:
        """The prompt ``text`` (one ``MEDIA_MARKER`` per medium, in order) as a batcher
        Prompt: text tokens, and a placeholder run per medium. Runs on the engine's thread."""
        self.check(media)
        mtmd = self.mtmd
        bitmaps: list[Any] = []
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            bitmaps += (self.bitmap(m) for m in media)
            encoded = text.encode("utf-8")
            source = mtmd.mtmd_input_text(encoded, len(encoded), False, True)  # no BOS added, specials parsed
            array = (mtmd.mtmd_bitmap_p_ctypes * max(len(bitmaps), 1))(*bitmaps)
            status = mtmd.mtmd_tokenize(self.ctx, chunks, ctypes.byref(source), array, len(bitmaps))
        except BaseException:
            mtmd.mtmd_input_chunks_free(chunks)
            raise
        finally:
            for bitmap in bitmaps:
                mtmd.mtmd_bitmap_free(bitmap)  # the chunks hold the preprocessed media
        if status != 0:
            mtmd.mtmd_input_chunks_free(chunks)
            what = "the media markers and media differ in number" if status == 1 else "preprocessing failed"
            raise RequestError(
                f"llama.cpp could not read the request's media for '{self.model_id}': {what}",
                "send PNG, JPEG, WebP or GIF images and WAV or MP3 audio",
            )
        try:
            return self.prompt(chunks, media)
        except BaseException:
            mtmd.mtmd_input_chunks_free(chunks)
            raise

    def prompt(self, chunks: Any, media: list[Media]) -> Prompt:
        """The Prompt of tokenized ``chunks``. A medium may be several chunks (the tiles of
        an image, the 30 s windows of a clip): each media chunk belongs to the medium whose
        digest it carries as its id, the current one or the next."""
        mtmd = self.mtmd
        tokens: list[int] = []
        spans: dict[int, MediaSpan] = {}
        cells, current, part = 0, -1, 0
        for index in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, index)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                count = ctypes.c_size_t(0)
                ids = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
                tokens += ids[: count.value]
                cells += count.value
                continue
            found = (mtmd.mtmd_input_chunk_get_id(chunk) or b"").decode()
            if current < 0 or found != media[current].digest:
                current, part = current + 1, 0
            if current >= len(media) or found != media[current].digest:
                raise EngineError(
                    f"llama.cpp's multimodal library made a media chunk localsample cannot place ({found[:12]})",
                    "report this with the model and projector names",
                )
            span = MediaSpan(self, chunk, media[current], part)
            if span.non_causal and span.tokens > self.n_ubatch:
                raise RequestError(
                    f"model '{self.model_id}': an image of {span.tokens} tokens must be decoded in one micro-batch "
                    f"(non-causal attention), but n_ubatch is {self.n_ubatch}",
                    f"raise n_ubatch (and n_batch) in [models.load] to at least {span.tokens}",
                )
            part += 1
            spans[len(tokens)] = span
            tokens += span.placeholders()
            cells += span.tokens
        return Prompt(tokens, spans, cells, closer=lambda: mtmd.mtmd_input_chunks_free(chunks))

    def bitmap(self, medium: Media) -> Any:
        """An mtmd bitmap of the medium, its id the digest (what mtmd caches by)."""
        mtmd = self.mtmd
        if medium.kind == "image":
            width, height, pixels = rgb_pixels(medium)
            bitmap = mtmd.mtmd_bitmap_init(width, height, (ctypes.c_uint8 * len(pixels)).from_buffer_copy(pixels))
        else:
            raw = (ctypes.c_uint8 * len(medium.data)).from_buffer_copy(medium.data)
            bitmap = mtmd.mtmd_helper_bitmap_init_from_buf(self.ctx, raw, len(medium.data), False)
        if not bitmap:
            raise RequestError(
                f"llama.cpp could not decode the {medium.kind} ({medium.describe()})",
                "send a WAV or MP3 file" if medium.kind == "audio" else "send a PNG, JPEG, WebP or GIF file",
            )
        mtmd.mtmd_bitmap_set_id(bitmap, medium.digest.encode())
        return bitmap

    def embeddings(self, span: MediaSpan) -> np.ndarray[Any, np.dtype[np.float32]]:
        """The chunk's embeddings: from the cache, or encoded now (and cached). Like every
        method here, it runs on the engine's thread only: the cache needs no lock."""
        key, size = span.key, span.tokens * self.n_embd
        found = self.cache.get(key)
        if found is not None and found.size == size:
            self.cache.move_to_end(key)
            self.stats.reused += 1
            return found
        started = time.perf_counter()
        if self.mtmd.mtmd_encode_chunk(self.ctx, span.chunk) != 0:
            raise EngineError(
                f"llama.cpp could not encode a {span.medium.kind} ({span.medium.describe()}) for '{self.model_id}'",
                "retry; if it keeps failing, check that the mmproj belongs to the model",
            )
        output = self.mtmd.mtmd_get_output_embd(self.ctx)
        embd = np.ctypeslib.as_array(output, shape=(size,)).copy()
        self.stats.encoded += 1
        self.stats.encode_seconds += time.perf_counter() - started
        replaced = self.cache.pop(key, None)
        self.cache_bytes -= replaced.nbytes if replaced is not None else 0
        self.cache[key] = embd
        self.cache_bytes += embd.nbytes
        while self.cache_bytes > EMBEDDING_CACHE_BYTES and len(self.cache) > 1:
            _, dropped = self.cache.popitem(last=False)
            self.cache_bytes -= dropped.nbytes
        return embd

    def decode(self, span: MediaSpan, ctx: llama_cpp.llama_context_p, seq: int, n_past: int, n_batch: int) -> None:
        embd = self.embeddings(span)
        end = llama_cpp.llama_pos(0)
        status = self.mtmd.mtmd_helper_decode_image_chunk(
            self.ctx,
            ctx,
            span.chunk,
            embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
            n_past,
            seq,
            min(n_batch, self.n_ubatch) if span.non_causal else n_batch,
            ctypes.byref(end),
            self.mtmd.mtmd_helper_post_decode_callback(),  # none (the bindings want a NULL function pointer)
            None,
        )
        if status != 0 or end.value != n_past + span.positions:
            raise EngineError(
                f"llama.cpp could not evaluate a {span.medium.kind} into the context of '{self.model_id}' "
                f"(status {status})",
                "retry; if it keeps failing, raise n_batch in the catalog (some projectors need a whole image "
                f"in one batch: this one is {span.tokens} tokens)",
            )
        self.stats.evaluated += span.tokens

    def close(self) -> None:
        if self.ctx is not None:
            self.mtmd.mtmd_free(self.ctx)
            self.ctx = None
            self.cache.clear()
