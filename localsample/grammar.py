"""The grammars that keep answers well-formed: tool calls in a dialect's format, JSON answers.

llama-cpp-python ships a JSON-schema → GBNF converter; ``Bounds`` adds what it leaves out
(integer and number bounds, JSON-strict strings, a default string length), so that every
answer decoded under the grammar is valid and can finish within maxTokens.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from localsample.errors import RequestError
from localsample.generation import Constraint, GenerationRequest, ToolSpec
from localsample.toolcalls import Dialect

MAX_PARALLEL_CALLS = 8
"""Most tool calls one answer may hold (a small model may otherwise repeat a call until
maxTokens runs out)."""


def constraint_for(request: GenerationRequest, dialect: Dialect) -> Constraint | None:
    """The grammar that keeps the answer well-formed, or None for free text."""
    if request.offers_tools:
        grammar = calls_grammar(request.tools, dialect, max_string(request.max_tokens))
        trigger = None if request.tool_choice == "required" else dialect.trigger
        return Constraint(grammar, trigger)
    if request.response_schema is not None:
        return Constraint(
            schema_grammar(request.response_schema, "metadata.response_format", max_string(request.max_tokens))
        )
    return None


MIN_STRING = 32
MAX_STRING = 1500
"""Bounds of the default string length (llama.cpp expands a bounded repetition into rules)."""

MAX_ENUMERATED_RANGE = 1000
"""Widest integer span of a bounded number the grammar spells out (0..1, 1..5, 0..100 …)."""

PLACEHOLDER = "__localsample_number_{}__"


class Bounds:
    """What the grammar adds to a schema so that every answer is valid and finishes.

    - ``enum`` and ``const`` values (the converter writes a backslash or quote in one into
      a broken literal), and bounded ``integer`` and ``number`` schemas, which llama-cpp-python's converter leaves
      unbounded: each is swapped for a placeholder constant before conversion and its
      placeholder for a rule of our own after. Handled: integer bounds spanning at most
      MAX_ENUMERATED_RANGE (numbers: from 0 up), and ``minimum`` 0 or 1 alone; any other
      bound is checked after decoding (``_check_input``).
    - Strings without a ``maxLength`` get ``max_string`` characters at most: a small model
      can fill a string forever (SmolLM2-135M did, past 1000 tokens), and a string that
      never closes is a call that never completes. A schema's own ``maxLength`` stands (up
      to MAX_STRING).
    """

    def __init__(self, max_string: int) -> None:
        self.max_string = max_string
        self.rules: dict[str, str] = {}  # rule text → its name (one rule for equal bounds)
        self.placeholders: list[str] = []  # the rule name of each placeholder, by index

    def replace(self, schema: Any) -> Any:
        if isinstance(schema, list):
            return [self.replace(item) for item in schema]
        if not isinstance(schema, dict):
            return schema
        rule = self._rule(schema)
        if rule is not None:
            name = self.rules.setdefault(rule, f"ls-value-{len(self.rules)}")
            self.placeholders.append(name)
            return {"const": PLACEHOLDER.format(len(self.placeholders) - 1)}
        return {key: self.replace(value) for key, value in schema.items()}

    def _rule(self, schema: dict[str, Any]) -> str | None:
        if "const" in schema or "enum" in schema:  # spelled here: the converter does not escape "\\"
            values = [schema["const"]] if "const" in schema else schema["enum"]
            if isinstance(values, list) and values:
                return " | ".join(gbnf_literal(json.dumps(value)) for value in values)
            return None
        if schema.get("type") == "string" and not set(schema) & {"pattern", "format"}:
            shortest = int(schema.get("minLength", 0))
            longest = min(int(schema.get("maxLength", self.max_string)), MAX_STRING)
            if longest < shortest:
                return None  # an impossible schema: the converter's own rule, and the check after
            return f'"\\"" ls-json-char{{{shortest},{longest}}} "\\""'
        return self._number_rule(schema)

    @staticmethod
    def _number_rule(schema: dict[str, Any]) -> str | None:
        kind = schema.get("type")
        unsupported = {"exclusiveMinimum", "exclusiveMaximum", "multipleOf", "enum", "const"}
        if kind not in ("number", "integer") or set(schema) & unsupported:
            return None
        low, high = schema.get("minimum"), schema.get("maximum")
        fraction = '("." [0-9]{1,12})?' if kind == "number" else ""
        if low == 0 and high is None:
            return f'("0" | [1-9] [0-9]{{0,15}}) {fraction}'
        if low == 1 and high is None:
            return f"[1-9] [0-9]{{0,15}} {fraction}"
        exact = all(isinstance(v, int | float) and float(v).is_integer() for v in (low, high))
        if not exact or low is None or high is None or low > high or high - low > MAX_ENUMERATED_RANGE:
            return None
        if kind == "integer":
            return " | ".join(f'"{n}"' for n in range(int(low), int(high) + 1))
        if low < 0:
            return None
        whole = " | ".join(f'"{n}"' for n in range(int(low), int(high)))
        top = f'"{int(high)}" ("." "0"{{1,12}})?'
        return f"({whole}) {fraction} | {top}" if whole else top

    def apply(self, grammar: str) -> str:
        grammar = strict_strings(grammar) + f"\nls-json-char ::= {JSON_CHAR}"
        for index, name in enumerate(self.placeholders):
            literal = json.dumps(json.dumps(PLACEHOLDER.format(index)))  # as the converter writes a const
            grammar = grammar.replace(literal, name)
        return grammar + "".join(f"\n{name} ::= {rule}" for rule, name in self.rules.items())


def gbnf_literal(text: str) -> str:
    """``text`` as a GBNF string literal."""
    escapes = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
    return '"' + "".join(escapes.get(char, char) for char in text) + '"'


def scoped(schema: Any, prefix: str) -> Any:
    """``schema`` with its ``$defs`` (and ``definitions``) renamed ``PREFIX + name``: the
    converter names a referenced rule by its last path segment, so two tools' ``Item``
    definitions would otherwise share one rule."""
    if isinstance(schema, list):
        return [scoped(item, prefix) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("$defs", "definitions") and isinstance(value, dict):
            result[key] = {f"{prefix}{name}": scoped(item, prefix) for name, item in value.items()}
        elif key == "$ref" and isinstance(value, str):
            result[key] = re.sub(r"^#/(\$defs|definitions)/", lambda m: f"{m.group(0)}{prefix}", value)
        else:
            result[key] = scoped(value, prefix)
    return result


JSON_CHAR = '[^"\\\\\\x7F\\x00-\\x1F] | "\\\\" (["\\\\/bfnrt] | "u" [0-9a-fA-F]{4})'
"""A character of a JSON string: no raw control characters, escapes as JSON has them."""

LOOSE_CHAR = 'char ::= [^"\\\\] |'
STRICT_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'


def strict_strings(grammar: str) -> str:
    """JSON strings without raw control characters (llama-cpp-python's converter lets a
    string hold raw newlines, which JSON forbids: a small model then writes prose into it)."""
    return grammar.replace(LOOSE_CHAR, STRICT_CHAR)


def _converter() -> Any:
    from llama_cpp.llama_grammar import SchemaConverter

    return SchemaConverter(  # type: ignore[no-untyped-call]
        prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False
    )


def max_string(max_tokens: int) -> int:
    """The longest string an answer of ``max_tokens`` tokens gets when its schema sets no
    ``maxLength``: one character a token. Text runs 2-4 characters a token (a runaway
    string of SmolLM2-135M: 1.9), so the string closes with tokens left to finish."""
    return max(MIN_STRING, min(max_tokens, MAX_STRING))


def schema_grammar(schema: Mapping[str, Any], where: str, max_string: int = 1000) -> str:
    """GBNF for JSON following ``schema`` (its top rule is ``root``)."""
    converter = _converter()
    numbers = Bounds(max_string)
    try:
        resolved = converter.resolve_refs(numbers.replace(json.loads(json.dumps(schema))), where)
        converter.visit(resolved, "")
        return numbers.apply(str(converter.format_grammar()))
    except Exception as exc:  # the converter raises assertions, KeyErrors, ValueErrors
        raise RequestError(
            f"{where}: the JSON schema cannot be turned into a grammar ({type(exc).__name__}: {exc})",
            "simplify the schema (local $refs, types, properties, enums, arrays and anyOf are supported)",
        ) from None


def calls_grammar(tools: Sequence[ToolSpec], dialect: Dialect, max_string: int = 1000) -> str:
    """GBNF for one to MAX_PARALLEL_CALLS calls of the given tools, in the dialect's format."""
    converter = _converter()
    numbers = Bounds(max_string)
    alternatives = []
    for index, tool in enumerate(tools):
        where = f"params.tools[{index}].inputSchema"
        try:
            schema = scoped(numbers.replace(json.loads(json.dumps(tool.input_schema))), f"t{index}-")
            schema = converter.resolve_refs(schema, where)
        except Exception as exc:
            raise RequestError(f"{where}: {exc}", "use only local $refs (#/...) in the schema") from None
        properties = {"name": numbers.replace({"const": tool.name}), dialect.args_key: schema}
        if dialect.listed:  # Mistral's calls may carry their 9-character id
            properties["id"] = {"type": "string", "pattern": "^[a-zA-Z0-9]{9}$"}
        alternatives.append(
            {
                "type": "object",
                "properties": properties,
                "required": ["name", dialect.args_key],
                "additionalProperties": False,
            }
        )
    try:
        converter.visit({"anyOf": alternatives}, "call")
        rules = numbers.apply(str(converter.format_grammar()))
    except Exception as exc:
        raise RequestError(
            f"params.tools: an inputSchema cannot be turned into a grammar ({type(exc).__name__}: {exc})",
            "simplify the schema (local $refs, types, properties, enums, arrays and anyOf are supported)",
        ) from None
    more = MAX_PARALLEL_CALLS - 1
    if dialect.listed:
        root = f'root ::= "{dialect.opener}[" call ("," space call){{0,{more}}} "]"'
    elif dialect.closer:
        opener, closer = _literal(dialect.opener), _literal(dialect.closer)
        root = (
            f"root ::= ls-block (ls-sep ls-block){{0,{more}}}\n"
            f'ls-block ::= {opener} "\\n"? call "\\n"? {closer}\n'
            'ls-sep ::= "\\n"{0,2}'
        )
    else:
        root = "root ::= call"
    return f"{root}\n{rules}"


def _literal(text: str) -> str:
    return json.dumps(text)  # GBNF string literals escape like JSON for these ASCII markers
