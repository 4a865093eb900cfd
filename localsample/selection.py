"""Which catalog model serves a request, and why.

Pure functions over the catalog: no llama.cpp, no I/O except the ``available`` check that
callers pass in. Hints are names, never paths: a hint only ever matches catalog names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from localsample.catalog import Catalog, ModelEntry


@dataclass(frozen=True)
class Choice:
    model: ModelEntry
    reason: str


def hint_matches(hint: str, model: ModelEntry) -> bool:
    """A hint matches a model when it names it: the hint is part of one of the model's
    names ("smollm2" ⊂ "smollm2-135m-instruct"), or one of its aliases is part of the hint
    ("haiku" ⊂ "claude-3-5-haiku-latest")."""
    needle = hint.strip().lower()
    if not needle or is_path_like(needle):
        return False
    for name in model.names():
        name = name.lower()
        if needle in name:
            return True
    return any(alias.lower() in needle for alias in model.aliases)


def is_path_like(hint: str) -> bool:
    """Paths and URLs are never names: they match nothing and load nothing."""
    return "/" in hint or "\\" in hint or hint.endswith(".gguf") or hint.startswith(".")


def choose(
    catalog: Catalog,
    hints: Sequence[str],
    default: str,
    available: Callable[[ModelEntry], bool] = lambda _: True,
) -> Choice:
    """The first hint that matches an available model wins; otherwise the default model."""
    skipped: list[str] = []
    for hint in hints:
        matches = [m for m in catalog if hint_matches(hint, m)]
        ready = [m for m in matches if available(m)]
        if ready:
            return Choice(ready[0], f"hint '{hint}' matched '{ready[0].id}'")
        if matches:
            skipped.append(f"hint '{hint}' matched only models not on disk ({', '.join(m.id for m in matches)})")
    model = catalog.get(default)
    reason = "default model" if not hints else "default model; " + (
        "; ".join(skipped) if skipped else f"no catalog model matched hints {list(hints)}"
    )
    return Choice(model, reason)
