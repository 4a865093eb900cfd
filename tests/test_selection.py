"""Selection rules, table-driven on a synthetic catalog (pure functions, no llama.cpp)."""

from __future__ import annotations

import pytest

from localsample.catalog import merge, parse_catalog
from localsample.errors import RequestError, UnknownModelError
from localsample.selection import Needs, Preferences, ServerPolicy, hint_matches, score, select

CATALOG = merge(
    [
        (
            parse_catalog(
                """
[[models]]
id = "tiny-chat"
source = "tiny.gguf"
family = "tinyfam"
aliases = ["haiku", "mini"]
cost = 0.05
speed = 0.95
intelligence = 0.10
[models.load]
n_ctx = 4096

[[models]]
id = "mid-chat"
source = "mid.gguf"
family = "midfam"
aliases = ["sonnet", "gpt-4o"]
cost = 0.40
speed = 0.60
intelligence = 0.50
[models.load]
n_ctx = 32768

[[models]]
id = "big-vision"
source = "big.gguf"
mmproj = "big-mmproj.gguf"
family = "midfam"
capabilities = ["chat", "vision", "tools"]
cost = 0.80
speed = 0.20
intelligence = 0.90
[models.load]
n_ctx = 8192

[[models]]
id = "missing-chat"
source = "gone.gguf"
family = "ghost"
aliases = ["opus"]
cost = 0.9
speed = 0.1
intelligence = 1.0
""",
                "test.toml",
            ),
            "test.toml",
        )
    ]
)
ON_DISK = {"tiny-chat", "mid-chat", "big-vision"}


def pick(
    hints: tuple[str, ...] = (),
    cost: float | None = None,
    speed: float | None = None,
    intelligence: float | None = None,
    needs: Needs | None = None,
    policy: ServerPolicy | None = None,
    default: str = "tiny-chat",
) -> tuple[str, str]:
    choice = select(
        CATALOG,
        needs or Needs(),
        Preferences(hints, cost, speed, intelligence),
        default=default,
        available=lambda m: m.id in ON_DISK,
        policy=policy,
        server="writer",
    )
    return choice.model.id, choice.reason


@pytest.mark.parametrize(
    ("kwargs", "model", "in_reason"),
    [
        ({}, "tiny-chat", "default model"),  # no preferences at all
        ({"default": "mid-chat"}, "mid-chat", "default model"),
        ({"hints": ("sonnet",)}, "mid-chat", "hint 'sonnet'"),  # alias
        ({"hints": ("claude-3-5-sonnet-20241022",)}, "mid-chat", "hint 'claude-3-5-sonnet"),  # alias inside hint
        ({"hints": ("MID",)}, "mid-chat", "hint 'MID'"),  # case-insensitive substring of an id
        ({"hints": ("gpt-4o-mini",)}, "tiny-chat", "also matched: mid-chat"),  # "mini" and "gpt-4o" are words
        ({"hints": ("gemini-1.5",)}, "tiny-chat", "hint 'gemini-1.5' matched no model"),  # "mini" is no word
        ({"hints": ("tinyfam",)}, "tiny-chat", "hint 'tinyfam'"),  # family
        ({"hints": ("gpt-7", "haiku")}, "tiny-chat", "hint 'gpt-7' matched no model"),  # first that matches
        ({"hints": ("haiku", "sonnet")}, "tiny-chat", "hint 'haiku'"),  # order matters
        ({"hints": ("gpt-7",)}, "tiny-chat", "default model"),  # unknown hint, no priorities
        # ties among a hint's matches: the priority score, then catalog order
        ({"hints": ("midfam",)}, "mid-chat", "also matched: big-vision"),
        ({"hints": ("midfam",), "intelligence": 1.0}, "big-vision", "also matched: mid-chat"),
        # a hint matching only a missing model says so, with the pull command
        ({"hints": ("opus",)}, "tiny-chat", "localsample models pull missing-chat"),
        # priorities
        ({"cost": 1.0}, "tiny-chat", "best priority score 0.95"),
        ({"speed": 1.0}, "tiny-chat", "best priority score"),
        ({"intelligence": 1.0}, "big-vision", "best priority score 0.90"),
        ({"intelligence": 1.0, "cost": 1.0}, "mid-chat", "best priority score"),
        ({"cost": 0.0, "speed": 0.0, "intelligence": 0.0}, "tiny-chat", "default model"),  # all zero = none
        ({"hints": ("gpt-7",), "intelligence": 0.9}, "big-vision", "best priority score"),
        # capabilities and context
        ({"needs": Needs(frozenset({"vision"}))}, "big-vision", "cannot serve (no vision capability)"),
        ({"needs": Needs(frozenset({"tools"})), "hints": ("haiku",)}, "big-vision", "matched only tiny-chat"),
        ({"needs": Needs(prompt_tokens=1000, max_tokens=5000)}, "mid-chat", "n_ctx 4096 <"),
        # per-server overrides win over hints
        ({"policy": ServerPolicy(pin="mid-chat"), "hints": ("haiku",)}, "mid-chat", "pinned for server 'writer'"),
        ({"policy": ServerPolicy(allow=("big-vision",)), "hints": ("haiku",)}, "big-vision", "not allowed"),
        ({"policy": ServerPolicy(allow=("gpt-4o", "big-vision"))}, "mid-chat", "first that can"),
    ],
)
def test_selection_rules(kwargs: dict[str, object], model: str, in_reason: str) -> None:
    chosen, reason = pick(**kwargs)  # type: ignore[arg-type]
    assert chosen == model
    assert in_reason in reason


def test_priority_score_formula() -> None:
    mid = CATALOG.get("mid-chat")
    assert score(mid, Preferences()) == 0.0
    assert score(mid, Preferences(cost=1.0)) == pytest.approx(0.60)  # 1 - cost
    assert score(mid, Preferences(cost=0.5, speed=0.5)) == pytest.approx((0.5 * 0.6 + 0.5 * 0.6) / 1.0)
    assert score(mid, Preferences(cost=0.2, intelligence=0.6)) == pytest.approx((0.2 * 0.6 + 0.6 * 0.5) / 0.8)


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_out_of_range_priorities_are_refused(value: float) -> None:
    with pytest.raises(RequestError, match="Priority must be between 0 and 1"):
        Preferences(speed=value)


@pytest.mark.parametrize("hint", ["../tiny.gguf", "/etc/passwd", "hf://org/repo/tiny.gguf", "tiny.gguf", "..", "C:\\m"])
def test_path_like_hints_match_nothing(hint: str) -> None:
    assert not any(hint_matches(hint, m) for m in CATALOG)
    assert pick(hints=(hint,)) == ("tiny-chat", f"hint '{hint}' matched no model; default model")


def test_no_candidate_names_the_needs_and_what_the_catalog_has() -> None:
    with pytest.raises(RequestError) as info:
        pick(needs=Needs(frozenset({"audio"}), prompt_tokens=10, max_tokens=20))
    message = str(info.value)
    assert "needs audio" in message and "maxTokens 20" in message
    assert "tiny-chat: no audio capability" in message and "missing-chat: no audio capability" in message
    assert info.value.mcp_code == -32602


def test_a_pinned_model_that_cannot_serve_says_why() -> None:
    with pytest.raises(RequestError, match="pinned for server 'writer', cannot serve this request: no vision"):
        pick(policy=ServerPolicy(pin="tiny-chat"), needs=Needs(frozenset({"vision"})))
    with pytest.raises(UnknownModelError):
        pick(policy=ServerPolicy(pin="nope"))


def test_ranking_lists_every_model_with_score_and_exclusion() -> None:
    choice = select(
        CATALOG, Needs(), Preferences(intelligence=1.0), default="tiny-chat", available=lambda m: m.id in ON_DISK
    )
    ranking = [(r.model.id, round(r.score, 2), r.excluded) for r in choice.ranking]
    assert ranking == [
        ("big-vision", 0.9, None),
        ("mid-chat", 0.5, None),
        ("tiny-chat", 0.1, None),
        ("missing-chat", 1.0, "not downloaded: localsample models pull missing-chat"),
    ]
