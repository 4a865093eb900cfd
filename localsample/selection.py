"""Which catalog model serves a request, and why.

``select`` is a pure function of the catalog, the request's needs, its model preferences,
the server's policy and a predicate telling which models are on disk. It applies, in order:

1. the server's allow-list (settings), if any;
2. capabilities: image content needs ``vision``, audio ``audio``, and the prompt plus
   maxTokens must fit the model's ``n_ctx``;
3. only models whose file is on disk;
4. a model pinned for the server (settings) wins over everything below;
   then, for a request that offers tools, models with the ``tools`` capability (their
   chat template writes tool calls) if any can serve; else any model, with the generic
   tool prompt (toolcalls.py), which the reason says;
5. hints, in order: the first hint matching any candidate wins (matching = the hint is
   part of an id, alias or family, or an alias is a whole word of the hint;
   case-insensitive);
   ties among its matches go to the priority score, then catalog order;
6. no hint matched: with any priority > 0, the highest priority score; else the default.

Priority score = (costPriority·(1-cost) + speedPriority·speed + intelligencePriority·
intelligence) / (costPriority + speedPriority + intelligencePriority); absent = 0.

Hints are names, never paths: ``../x.gguf``, ``/etc/passwd`` or ``hf://…`` match nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from localsample.catalog import Catalog, ModelEntry
from localsample.errors import RequestError

CAPABILITIES = ("vision", "audio", "tools")
MEDIA = frozenset({"vision", "audio"})
"""Capabilities that need a projector (mmproj) beside a local model's GGUF."""
MEDIA_FIX = (
    "add a model that reads them: `localsample models pull ORG/REPO` of a GGUF repo with an mmproj file "
    "(e.g. ggml-org/SmolVLM-256M-Instruct-GGUF:Q8_0), or `localsample models import MODEL.gguf --mmproj MMPROJ.gguf`"
)
PREFERRED = frozenset({"tools"})
"""Capabilities a request prefers rather than needs: any model can call tools (the generic
prompt and the grammar keep its calls well-formed), a model trained for it calls better."""


@dataclass(frozen=True)
class Needs:
    """What a request needs from a model."""

    capabilities: frozenset[str] = frozenset()
    prompt_tokens: int = 0  # an estimate: no tokenizer is loaded yet
    max_tokens: int = 0

    @property
    def context_tokens(self) -> int:
        return self.prompt_tokens + self.max_tokens


@dataclass(frozen=True)
class Preferences:
    """MCP ``modelPreferences``: hints and priorities in 0..1 (None = absent = 0)."""

    hints: tuple[str, ...] = ()
    cost: float | None = None
    speed: float | None = None
    intelligence: float | None = None

    def __post_init__(self) -> None:
        for name in ("cost", "speed", "intelligence"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise RequestError(
                    f"modelPreferences.{name}Priority must be between 0 and 1 (got {value})",
                    f"send {name}Priority in 0..1",
                )

    @property
    def weights(self) -> tuple[float, float, float]:
        return (self.cost or 0.0, self.speed or 0.0, self.intelligence or 0.0)


@dataclass(frozen=True)
class ServerPolicy:
    """Per-server model overrides from settings."""

    pin: str | None = None
    allow: tuple[str, ...] = ()


@dataclass(frozen=True)
class Ranked:
    model: ModelEntry
    score: float
    excluded: str | None = None  # why it cannot serve this request, if it cannot


@dataclass(frozen=True)
class Choice:
    model: ModelEntry
    reason: str
    ranking: tuple[Ranked, ...] = field(default=(), compare=False)


def score(model: ModelEntry, prefs: Preferences) -> float:
    cost, speed, intelligence = prefs.weights
    total = cost + speed + intelligence
    if total == 0:
        return 0.0
    return (cost * (1.0 - model.cost) + speed * model.speed + intelligence * model.intelligence) / total


def is_path_like(hint: str) -> bool:
    """Paths and URLs are never names: they match nothing and load nothing."""
    return "/" in hint or "\\" in hint or hint.endswith(".gguf") or hint.startswith(".")


def _words(text: str) -> str:
    """``"Claude-3.5 Haiku"`` → ``"-claude-3-5-haiku-"``: words between dashes."""
    return "-" + "-".join(re.findall(r"[a-z0-9]+", text.lower())) + "-"


def hint_matches(hint: str, model: ModelEntry) -> bool:
    """The hint is part of one of the model's names ("smollm2" ⊂ "smollm2-135m-instruct"),
    or one of its aliases is a whole word (or words) of the hint ("haiku" in
    "claude-3-5-haiku-latest", "gpt-4o" in "gpt-4o-mini", but "mini" not in "gemini")."""
    needle = hint.strip().lower()
    if not needle or is_path_like(needle):
        return False
    if any(needle in name.lower() for name in model.names()):
        return True
    words = _words(needle)
    return any(_words(alias) in words for alias in model.aliases)


CHARS_PER_TOKEN = 3
"""The estimate's characters a token (prose has about 4; JSON and code fewer)."""


def estimate_tokens(text_chars: int, messages: int) -> int:
    """A rough token estimate before any tokenizer is loaded (about 3 characters a
    token, plus the chat template's few tokens a message); the engine checks exactly."""
    return text_chars // CHARS_PER_TOKEN + 8 * messages + 16


def _unfit(model: ModelEntry, needs: Needs) -> str | None:
    missing = sorted(needs.capabilities - PREFERRED - set(model.capabilities))
    if missing:
        return f"no {'/'.join(missing)} capability"
    media = sorted(needs.capabilities & MEDIA)
    if media and not model.mmproj and not model.remote:
        return f"{'/'.join(media)} capability but no projector (set mmproj in its entry)"
    if needs.context_tokens > model.load.n_ctx:
        return f"n_ctx {model.load.n_ctx} < ~{needs.context_tokens} tokens needed"
    return None


def rank(
    catalog: Catalog,
    needs: Needs,
    prefs: Preferences,
    *,
    available: Callable[[ModelEntry], bool],
    allow: Sequence[str],
    server: str,
    why_unavailable: Callable[[ModelEntry], str] | None = None,
) -> list[Ranked]:
    """Every model with its priority score and why it cannot serve (None if it can): the
    ones that can first, by score, then catalog order."""
    allowed = {catalog.get(name).id for name in allow}
    ranking: list[Ranked] = []
    for model in catalog:
        why = None
        if allowed and model.id not in allowed:
            why = f"not allowed for server '{server}'"
        elif (unfit := _unfit(model, needs)) is not None:
            why = unfit
        elif not available(model):
            if why_unavailable is not None:
                why = why_unavailable(model)
            elif model.remote:
                why = f"no endpoint answers ({', '.join(model.urls)}; `localsample doctor` checks them)"
            else:
                why = f"not downloaded: localsample models pull {model.id}"
        ranking.append(Ranked(model, score(model, prefs), why))
    ranking.sort(key=lambda r: (r.excluded is not None, -r.score))  # stable: catalog order on ties
    return ranking


def select(
    catalog: Catalog,
    needs: Needs,
    prefs: Preferences,
    *,
    default: str,
    available: Callable[[ModelEntry], bool] = lambda _: True,
    policy: ServerPolicy | None = None,
    server: str = "server",
    why_unavailable: Callable[[ModelEntry], str] | None = None,
) -> Choice:
    """The model for a request and the reason, with every model ranked (see module doc);
    ``why_unavailable`` says why ``available`` said no (the pool knows: offline, no answer)."""
    policy = policy or ServerPolicy()
    ranking = rank(
        catalog, needs, prefs, available=available, allow=policy.allow, server=server, why_unavailable=why_unavailable
    )
    ranked = tuple(ranking)
    candidates = [r.model for r in ranking if r.excluded is None]
    if not candidates:
        raise RequestError(
            f"no model in the catalog can serve this request (it needs {_describe(needs)}); "
            + "; ".join(f"{r.model.id}: {r.excluded}" for r in ranking),
            MEDIA_FIX
            if needs.capabilities & MEDIA
            else "pull or add a model with what the request needs, or relax the server's allow-list",
        )

    if policy.pin is not None:
        pinned = catalog.get(policy.pin)
        if pinned not in candidates:
            why = next(r.excluded for r in ranking if r.model.id == pinned.id)
            raise RequestError(
                f"model '{pinned.id}', pinned for server '{server}', cannot serve this request: {why}",
                f"change servers.{server}.model in the settings (or pull the model if it is not downloaded)",
            )
        return Choice(pinned, f"pinned for server '{server}' in settings", ranked)

    notes: list[str] = []
    preferred = needs.capabilities & PREFERRED
    wanted = "/".join(sorted(preferred))
    if preferred:
        fitting = [m for m in candidates if preferred <= set(m.capabilities)]
        if fitting:
            candidates = fitting
            notes.append(f"{wanted} capability preferred")
        else:
            capable = [r for r in ranking if preferred <= set(r.model.capabilities)]
            why = f" ({'; '.join(f'{r.model.id}: {r.excluded}' for r in capable)})" if capable else ""
            notes.append(f"no model with the {wanted} capability can serve{why}: any model serves")
    for hint in prefs.hints:
        matches = [m for m in candidates if hint_matches(hint, m)]
        if matches:
            best = matches[0]  # candidates are sorted by score, then catalog order
            also = f" (also matched: {', '.join(m.id for m in matches[1:])})" if len(matches) > 1 else ""
            return Choice(best, "; ".join([*notes, f"hint '{hint}' matched '{best.id}'{also}"]), ranked)
        unusable = [(r.model, r.excluded or f"no {wanted} capability") for r in ranking if r.model not in candidates]
        unusable = [(model, why) for model, why in unusable if hint_matches(hint, model)]
        if unusable:
            notes.append(f"hint '{hint}' matched only " + ", ".join(f"{m.id} ({why})" for m, why in unusable))
        else:
            notes.append(f"hint '{hint}' matched no model")

    if any(prefs.weights):
        best = candidates[0]
        cost, speed, intelligence = prefs.weights
        weights = f"cost {cost:g}, speed {speed:g}, intelligence {intelligence:g}"
        return Choice(best, "; ".join([*notes, f"best priority score {score(best, prefs):.2f} ({weights})"]), ranked)

    fallback = catalog.get(default)
    if fallback in candidates:
        return Choice(fallback, "; ".join([*notes, "default model"]), ranked)
    first = next(m for m in catalog if m in candidates)
    why = (
        next(r.excluded for r in ranking if r.model.id == fallback.id) or f"no {'/'.join(sorted(preferred))} capability"
    )
    note = f"default model '{fallback.id}' cannot serve ({why}); first that can"
    return Choice(first, "; ".join([*notes, note]), ranked)


def _describe(needs: Needs) -> str:
    parts = sorted(needs.capabilities)
    if needs.context_tokens:
        parts.append(f"~{needs.prompt_tokens} prompt tokens + maxTokens {needs.max_tokens} of context")
    return ", ".join(parts) or "nothing special"
