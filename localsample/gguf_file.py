"""What a GGUF file says about itself, read from its header (no model is loaded).

A small reader of the GGUF header (format v2/v3: key/values, then tensor infos) over an
mmap. The ``gguf`` package reads the same, but turns every vocabulary entry into Python
objects: 2.4 s for SmolLM2's header and 10.5 s for Gemma 3's, against milliseconds here,
which skips arrays it does not need. Quantization names come from llama-cpp-python's
``LLAMA_FTYPE_*`` constants.
"""

from __future__ import annotations

import hashlib
import mmap
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from localsample.errors import ModelFileError

SPLIT = re.compile(r"-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
QUANT = re.compile(r"(?i)(?<![a-z0-9])(iq\d_[a-z0-9]+|q\d_k_[sml]|q\d_k|q\d_\d|f16|bf16|f32)(?![a-z0-9])")

TEMPLATE_FAMILIES = [
    ("<|im_start|>", "chatml"),
    ("<|start_header_id|>", "llama3"),
    ("<start_of_turn>", "gemma"),
    ("[INST]", "mistral/llama2"),
    ("<|user|>", "phi/zephyr"),
    ("<\N{FULLWIDTH VERTICAL LINE}User\N{FULLWIDTH VERTICAL LINE}>", "deepseek"),
]


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    architecture: str
    name: str | None
    parameters: int
    quantization: str
    context_length: int | None
    chat_template: str | None
    split_count: int
    is_projector: bool
    projector_reads: tuple[str, ...] = ()
    """A projector's capabilities: ``vision`` and/or ``audio`` (its ``clip.has_*_encoder``
    keys; a projector that has neither key is an older vision one)."""

    @property
    def template_family(self) -> str | None:
        if not self.chat_template:
            return None
        return next((family for marker, family in TEMPLATE_FAMILIES if marker in self.chat_template), "other")


GGUF_MAGIC = b"GGUF"
"""The four bytes every GGUF file starts with."""


def check_gguf_file(path: Path, model_id: str) -> None:
    """Raise ModelFileError unless ``path`` is a readable file that starts like a GGUF."""
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except FileNotFoundError as exc:
        raise ModelFileError(
            f"model '{model_id}': file {path} does not exist",
            f"run `localsample models pull {model_id}`, or correct `source` in the catalog",
        ) from exc
    except OSError as exc:
        raise ModelFileError(f"model '{model_id}': cannot read {path}: {exc}", "check the file's permissions") from exc
    if magic != GGUF_MAGIC:
        raise ModelFileError(
            f"model '{model_id}': {path} is not a GGUF file (it does not start with b'GGUF')",
            f"run `localsample models pull {model_id}` to download it again; localsample loads only .gguf files",
        )


def files_size(path: Path) -> int:
    """Bytes of a GGUF and its other split parts (the parts on disk)."""
    return paths_size(p for p in split_parts(path) if p.exists())


def paths_size(paths: Iterable[Path]) -> int:
    """Bytes of the given files together (each must exist)."""
    return sum(p.stat().st_size for p in paths)


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in 1 MB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def split_parts(path: Path) -> list[Path]:
    """All shards of a split GGUF (``-00001-of-00003.gguf``), or just ``path``."""
    match = SPLIT.search(path.name)
    if not match:
        return [path]
    count = int(match["count"])
    stem = path.name[: match.start()]
    return [path.with_name(f"{stem}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def id_like(name: str) -> str:
    """A catalog id made from a file name: ``Qwen2.5-1.5B-Q4_K_M-00001-of-00002.gguf`` →
    ``qwen2.5-1.5b-q4_k_m``."""
    stem = SPLIT.sub("", Path(name).name).removesuffix(".gguf")
    return re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._") or "model"


def quant_from_name(name: str) -> str | None:
    match = QUANT.search(name)
    return match.group(1).upper() if match else None


# GGUF value types: struct format of the scalars; 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Header:
    """Reads key/values and tensor shapes from a GGUF's first bytes."""

    def __init__(self, data: mmap.mmap) -> None:
        self.data = data
        self.pos = 0

    def scalar(self, fmt: str) -> Any:
        value = struct.unpack_from("<" + fmt, self.data, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        size = self.scalar("Q")
        text = bytes(self.data[self.pos : self.pos + size]).decode("utf-8", errors="replace")
        self.pos += size
        return text

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.scalar("I"), self.scalar("Q")
            if item in _SCALARS:
                self.pos += count * struct.calcsize(_SCALARS[item])
            else:
                for _ in range(count):
                    self.value(item)
            return None
        raise ValueError(f"unknown GGUF value type {kind}")

    def read(self) -> tuple[dict[str, Any], list[tuple[int, ...]]]:
        if self.data[:4] != GGUF_MAGIC:
            raise ValueError("no GGUF magic")
        self.pos = 4
        version = self.scalar("I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported")
        n_tensors, n_kv = self.scalar("Q"), self.scalar("Q")
        values: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self.string()
            values[key] = self.value(self.scalar("I"))
        shapes: list[tuple[int, ...]] = []
        end = 0  # where the tensor data ends, relative to its start
        for _ in range(n_tensors):
            self.string()
            dims = self.scalar("I")
            shape = struct.unpack_from(f"<{dims}Q", self.data, self.pos)
            self.pos += 8 * dims
            kind, offset = self.scalar("I"), self.scalar("Q")
            shapes.append(shape)
            end = max(end, offset + tensor_bytes(kind, _elements(shape)))
        alignment = int(values.get("general.alignment") or 32)
        data_start = -(-self.pos // alignment) * alignment
        if n_tensors and data_start + end > len(self.data):
            raise ValueError(f"truncated: its tensors need {data_start + end} bytes, the file has {len(self.data)}")
        return values, shapes


# ggml tensor types: (elements per block, bytes per block). The types of the GGUFs people
# run; a tensor of a type not listed counts from its offset only.
GGML_BLOCKS: dict[int, tuple[int, int]] = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    10: (256, 84),  # Q2_K
    11: (256, 110),  # Q3_K
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
    20: (32, 18),  # IQ4_NL
    23: (256, 136),  # IQ4_XS
    24: (1, 1),  # I8
    25: (1, 2),  # I16
    26: (1, 4),  # I32
    30: (1, 2),  # BF16
}


def tensor_bytes(kind: int, elements: int) -> int:
    """Bytes of a tensor of ggml type ``kind`` (0 for a type not in GGML_BLOCKS)."""
    block = GGML_BLOCKS.get(kind)
    return 0 if block is None else elements // block[0] * block[1]


def _header(path: Path) -> tuple[dict[str, Any], list[tuple[int, ...]]]:
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return _Header(data).read()


def _elements(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


@cache
def _file_types() -> dict[int, str]:
    import llama_cpp

    prefix = "LLAMA_FTYPE_"
    names = {v: k.removeprefix(prefix) for k, v in vars(llama_cpp).items() if k.startswith(prefix)}
    return {v: n.removeprefix("MOSTLY_").removeprefix("ALL_") for v, n in names.items() if isinstance(v, int)}


def read_gguf(path: Path) -> GGUFInfo:
    """Header facts of a GGUF; a missing, truncated or non-GGUF file raises ModelFileError."""
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ModelFileError(f"cannot read {path}: {exc}", "check the path and its permissions") from exc
    if magic != GGUF_MAGIC:
        raise ModelFileError(
            f"{path} is not a GGUF file (it starts with {magic!r})", "give the path of a .gguf model file"
        )
    try:
        values, shapes = _header(path)
    except (ValueError, struct.error, IndexError, OSError) as exc:
        raise ModelFileError(
            f"{path} is a damaged GGUF file ({exc})", "download the file again; it may be truncated"
        ) from exc
    arch = str(values.get("general.architecture") or "unknown")
    file_type = values.get("general.file_type")
    quant = _file_types().get(int(file_type)) if isinstance(file_type, int) else None
    parameters = sum(_elements(shape) for shape in shapes)
    parts = split_parts(path)
    for part in parts[1:]:
        if part.is_file():
            parameters += sum(_elements(shape) for shape in _header(part)[1])
    context = values.get(f"{arch}.context_length")
    is_projector = arch == "clip" or "mmproj" in path.name.lower()
    reads = tuple(c for c in ("vision", "audio") if values.get(f"clip.has_{c}_encoder"))
    return GGUFInfo(
        path=path,
        architecture=arch,
        name=values.get("general.name"),
        parameters=parameters,
        quantization=quant or quant_from_name(path.name) or "unknown",
        context_length=int(context) if context is not None else None,
        chat_template=values.get("tokenizer.chat_template"),
        split_count=len(parts),
        is_projector=is_projector,
        projector_reads=(reads or ("vision",)) if is_projector else (),
    )


def human_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def human_count(count: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f}{unit}"
    return str(count)
