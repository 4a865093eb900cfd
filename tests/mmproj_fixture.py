"""Tiny synthetic multimodal projectors ("mmproj" GGUFs) for tests.

llama.cpp's multimodal library (mtmd) pairs a text model with a projector file: an encoder
that turns an image into a run of embeddings of the text model's width, which are decoded
in place of tokens. Real projectors are hundreds of megabytes; the tests only need one that
llama.cpp loads and runs, so this module writes one from seeded random weights in well under
a second, and the same arguments always give the same bytes.

``write_projector`` writes llava's ``mlp`` projector: the simplest vision projector in
llama.cpp's ``clip.cpp``. Its graph is a plain ViT (patch embedding, learned positions,
pre-norm transformer blocks) followed by a two-layer MLP, it needs no tokens in the text
model's vocabulary (the image chunk is not wrapped in begin/end markers) and its
preprocessing just resizes any image to ``image_size`` x ``image_size``. One image becomes
``(image_size // patch_size) ** 2`` embeddings: 16 with the defaults (32 px, 8 px patches).

Two quirks of llava's graph are handled here: it takes the output of the *penultimate*
block unless ``clip.vision.feature_layer`` says otherwise (so that key is written, to run
every block), and it swaps the FFN's up and down matrices when their shapes look like an
old conversion's (so ``n_ff`` must differ from ``hidden_size``).

``write_audio_projector`` writes ultravox's projector (a whisper encoder) the same way: any
clip of up to 30 s becomes ``audio_tokens()`` (75) embeddings, with no marker tokens either.

The weights are random (small normal values, unit norms) and mean nothing: the embeddings
are finite and deterministic, not meaningful, though they do depend on the image or audio.
Tensors are F32, in PyTorch's (out, in) layout, which GGUF stores reversed as ggml's ``ne``.
The file names its keys and tensors as llama.cpp 0.3.36's ``clip.cpp`` reads them; a wrong
name or value type makes ``mtmd_init_from_file`` fail (or, for value types, abort).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFWriter

N_EMBD_SMOLLM2_135M = 576  # SmolLM2-135M-Instruct's embedding width

# CLIP's own normalisation constants, as llava projectors carry them
CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def image_tokens(image_size: int = 32, patch_size: int = 8) -> int:
    """How many embeddings (and positions) one image becomes with ``write_projector``'s projector."""
    return (image_size // patch_size) ** 2


class _Weights:
    """Seeded F32 tensors: normal matrices of a small std, unit norm weights, zero biases."""

    def __init__(self, writer: GGUFWriter, seed: int, std: float) -> None:
        self.writer = writer
        self.rng = np.random.default_rng(seed)
        self.std = std

    def normal(self, name: str, *shape: int) -> None:
        self.writer.add_tensor(name, (self.rng.standard_normal(shape) * self.std).astype(np.float32))

    def constant(self, name: str, value: float, *shape: int) -> None:
        self.writer.add_tensor(name, np.full(shape, value, dtype=np.float32))

    def linear(self, name: str, n_out: int, n_in: int, *, bias: bool = True) -> None:
        self.normal(f"{name}.weight", n_out, n_in)
        if bias:
            self.constant(f"{name}.bias", 0.0, n_out)

    def norm(self, name: str, width: int, *, bias: bool = True) -> None:
        self.constant(f"{name}.weight", 1.0, width)
        if bias:
            self.constant(f"{name}.bias", 0.0, width)

    def blocks(self, prefix: str, n_layer: int, width: int, n_ff: int, *, k_bias: bool = True) -> None:
        """Pre-norm transformer blocks with layer norms (weight and bias) and biased linears."""
        for il in range(n_layer):
            block = f"{prefix}.blk.{il}"
            self.norm(f"{block}.ln1", width)
            for part in ("attn_q", "attn_k", "attn_v", "attn_out"):
                self.linear(f"{block}.{part}", width, width, bias=k_bias or part != "attn_k")
            self.norm(f"{block}.ln2", width)
            self.linear(f"{block}.ffn_up", n_ff, width)
            self.linear(f"{block}.ffn_down", width, n_ff)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _write(writer: GGUFWriter, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path


def _add_keys(writer: GGUFWriter, keys: dict[str, Any]) -> None:
    """GGUF key/values, typed as clip.cpp reads them (it asserts on a wrong type)."""
    for key, value in keys.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:  # a list: int32 or float32 elements
            writer.add_array(key, list(value))


def write_projector(
    path: Path,
    *,
    n_embd: int = N_EMBD_SMOLLM2_135M,
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 32,
    n_layer: int = 1,
    n_head: int = 4,
    n_ff: int = 64,
    projector_hidden: int = 64,
    std: float = 0.02,
) -> Path:
    """Write a synthetic llava ``mlp`` vision projector whose output width is ``n_embd``.

    ``n_embd`` must be the text model's embedding width (mtmd refuses a mismatch). With the
    defaults the file is about 220 KB and one image becomes ``image_tokens()`` (16) embeddings.
    Returns ``path``.
    """
    _check(image_size % patch_size == 0, "image_size must be a multiple of patch_size")
    _check(hidden_size % n_head == 0, "hidden_size must be a multiple of n_head")
    _check(n_ff != hidden_size, "n_ff must differ from hidden_size (llava would swap ffn up/down)")
    _check(min(n_embd, image_size, patch_size, n_layer, n_head, projector_hidden) > 0, "sizes must be positive")

    writer = GGUFWriter(path, "clip")
    _add_keys(
        writer,
        {
            "general.name": "localsample synthetic llava projector",
            "general.description": f"random weights, seed {seed}: for tests only",
            "clip.projector_type": "mlp",
            "clip.has_vision_encoder": True,
            "clip.has_audio_encoder": False,
            "clip.use_gelu": True,
            "clip.vision.image_size": image_size,
            "clip.vision.patch_size": patch_size,
            "clip.vision.embedding_length": hidden_size,
            "clip.vision.feed_forward_length": n_ff,
            "clip.vision.block_count": n_layer,
            "clip.vision.projection_dim": n_embd,
            "clip.vision.attention.head_count": n_head,
            "clip.vision.attention.layer_norm_epsilon": 1e-5,
            "clip.vision.image_mean": [float(v) for v in CLIP_IMAGE_MEAN],
            "clip.vision.image_std": [float(v) for v in CLIP_IMAGE_STD],
            "clip.vision.feature_layer": [n_layer],  # the last block's output (llava's default is the one before)
        },
    )

    weights = _Weights(writer, seed, std)
    n_patches = image_tokens(image_size, patch_size)
    weights.normal("v.patch_embd.weight", hidden_size, 3, patch_size, patch_size)
    weights.constant("v.patch_embd.bias", 0.0, hidden_size)
    weights.normal("v.position_embd.weight", n_patches, hidden_size)
    weights.norm("v.pre_ln", hidden_size)
    weights.blocks("v", n_layer, hidden_size, n_ff)
    weights.linear("mm.0", projector_hidden, hidden_size)
    weights.linear("mm.2", n_embd, projector_hidden)
    return _write(writer, path)


WHISPER_FRAMES = 3000  # mtmd cuts whisper-style log-mel input into 30 s windows of 3000 frames (10 ms hop)
WHISPER_POSITIONS = WHISPER_FRAMES // 2  # after the stride-2 convolution


def audio_tokens(stack_factor: int = 20) -> int:
    """How many embeddings one audio clip of up to 30 s becomes with ``write_audio_projector``'s projector."""
    return WHISPER_POSITIONS // stack_factor


def write_audio_projector(
    path: Path,
    *,
    n_embd: int = N_EMBD_SMOLLM2_135M,
    seed: int = 0,
    n_mel: int = 80,
    hidden_size: int = 32,
    n_layer: int = 1,
    n_head: int = 2,
    n_ff: int = 64,
    stack_factor: int = 20,
    projector_hidden: int = 32,
    std: float = 0.02,
) -> Path:
    """Write a synthetic ``ultravox`` audio projector (a whisper encoder) whose output width is ``n_embd``.

    Ultravox is the whisper-based projector with the fewest tensors that needs no marker tokens
    around the audio (qwen2a wraps it in ``<|audio_bos|>``/``<|audio_eos|>`` text). mtmd turns
    the samples into an ``n_mel``-bin log-mel spectrogram, one 3000-frame window per 30 s (shorter clips
    are padded), so every clip of up to 30 s becomes ``audio_tokens()`` (75) embeddings: 1500
    positions after the convolutions, stacked ``stack_factor`` at a time. ``stack_factor`` must
    divide 1500: otherwise the graph's padded stack and clip.cpp's token count disagree by one
    and llama.cpp aborts the process ("Invalid number of output tokens"). About 510 KB with the
    defaults. Returns ``path``.
    """
    _check(WHISPER_POSITIONS % stack_factor == 0, "stack_factor must divide 1500")
    _check(hidden_size % n_head == 0, "hidden_size must be a multiple of n_head")
    _check(1 <= n_mel <= 256, "n_mel must be in [1, 256]")
    _check(min(n_embd, hidden_size, n_layer, n_ff, projector_hidden) > 0, "sizes must be positive")

    writer = GGUFWriter(path, "clip")
    _add_keys(
        writer,
        {
            "general.name": "localsample synthetic ultravox projector",
            "general.description": f"random weights, seed {seed}: for tests only",
            "clip.projector_type": "ultravox",
            "clip.has_vision_encoder": False,
            "clip.has_audio_encoder": True,
            "clip.audio.num_mel_bins": n_mel,
            "clip.audio.embedding_length": hidden_size,
            "clip.audio.feed_forward_length": n_ff,
            "clip.audio.block_count": n_layer,
            "clip.audio.projection_dim": n_embd,
            "clip.audio.attention.head_count": n_head,
            "clip.audio.attention.layer_norm_epsilon": 1e-5,
            "clip.audio.projector.stack_factor": stack_factor,
        },
    )

    weights = _Weights(writer, seed, std)
    # conv biases are (channels, 1): they broadcast over the time axis of ggml's conv_1d output
    weights.normal("a.conv1d.1.weight", hidden_size, n_mel, 3)
    weights.constant("a.conv1d.1.bias", 0.0, hidden_size, 1)
    weights.normal("a.conv1d.2.weight", hidden_size, hidden_size, 3)
    weights.constant("a.conv1d.2.bias", 0.0, hidden_size, 1)
    weights.normal("a.position_embd.weight", WHISPER_POSITIONS, hidden_size)
    weights.blocks("a", n_layer, hidden_size, n_ff, k_bias=False)  # whisper's key projection has no bias
    weights.norm("a.post_ln", hidden_size)
    stacked = hidden_size * stack_factor
    weights.norm("mm.a.norm_pre", stacked, bias=False)
    weights.linear("mm.a.mlp.1", 2 * projector_hidden, stacked, bias=False)  # SwiGLU halves it
    weights.norm("mm.a.norm_mid", projector_hidden, bias=False)
    weights.linear("mm.a.mlp.2", n_embd, projector_hidden, bias=False)
    return _write(writer, path)


# -- media for requests -----------------------------------------------------------------


def image_bytes(
    width: int = 64, height: int = 48, color: tuple[int, int, int] = (200, 30, 30), kind: str = "PNG"
) -> bytes:
    """A small image file (PNG, JPEG, WEBP or GIF) of one colour with a diagonal line."""
    import io

    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), color)
    ImageDraw.Draw(image).line((0, 0, width, height), fill=(255, 255, 255), width=3)
    out = io.BytesIO()
    image.save(out, kind)
    return out.getvalue()


def wav_bytes(seconds: float = 1.0, rate: int = 16000) -> bytes:
    """A mono 16-bit WAV of a 440 Hz tone."""
    import io
    import wave

    t = np.arange(int(seconds * rate)) / rate
    samples = (np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2")
    out = io.BytesIO()
    with wave.open(out, "wb") as clip:
        clip.setnchannels(1)
        clip.setsampwidth(2)
        clip.setframerate(rate)
        clip.writeframes(samples.tobytes())
    return out.getvalue()


def b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode("ascii")
