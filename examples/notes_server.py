"""An MCP server over a directory of text notes: list, search, read, write, summarize.

Give it to a local agent, which answers its sampling request (summarize_note) too:

    localsample run --server "python examples/notes_server.py examples/notes" \
        "What does my note about the garden say I should plant?"

Only files directly inside the directory are reachable: a name with a path in it
("../x", "a/b") is refused. Errors are raised as ``ToolError`` so the message reaches
the client (the SDK hides the text of other exceptions). `summarize_note` asks the client's model for the summary,
declared with `Resolve(...)`/`Sample(...)` so it works on both protocol eras.
"""

import sys
from pathlib import Path
from typing import Annotated

from mcp import types
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.resolve import Resolve, Sample

NOTES = Path(sys.argv[1] if len(sys.argv) > 1 else "notes").resolve()
MAX_NOTE = 100_000
"""Characters a note may have (write_note refuses longer text)."""

server = MCPServer("notes")


def note_path(name: str) -> Path:
    """The file of note ``name`` (``.md`` added when it has no suffix), inside NOTES only."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ToolError(f"'{name}' is not a note name: use a plain file name such as garden.md")
    path = NOTES / (name if Path(name).suffix else f"{name}.md")
    if path.parent != NOTES:
        raise ToolError(f"'{name}' is outside the notes directory")
    return path


def read(name: str) -> str:
    path = note_path(name)
    if not path.is_file():
        known = ", ".join(sorted(p.name for p in NOTES.glob("*") if p.is_file())) or "none"
        raise ToolError(f"there is no note '{name}' (notes: {known})")
    return path.read_text(encoding="utf-8", errors="replace")


@server.tool()
def list_notes() -> str:
    """List the notes: one line each with its name and size."""
    files = sorted(p for p in NOTES.glob("*") if p.is_file())
    return "\n".join(f"{p.name} ({p.stat().st_size} bytes)" for p in files) or "(no notes)"


@server.tool()
def search_notes(query: str) -> str:
    """Find the lines of all notes that contain QUERY (case-insensitive): note:line: text."""
    if not query.strip():
        raise ToolError("the query is empty: give a word to look for")
    hits = []
    for path in sorted(p for p in NOTES.glob("*") if p.is_file()):
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if query.lower() in line.lower():
                hits.append(f"{path.name}:{number}: {line.strip()}")
    return "\n".join(hits[:50]) or f"no note mentions '{query}'"


@server.tool()
def read_note(name: str) -> str:
    """The whole text of one note, by its name (for example garden.md)."""
    return read(name)


@server.tool()
def write_note(name: str, text: str) -> str:
    """Create or replace a note with TEXT."""
    if len(text) > MAX_NOTE:
        raise ToolError(f"the text has {len(text)} characters; a note holds at most {MAX_NOTE}")
    path = note_path(name)
    NOTES.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return f"saved {path.name} ({len(text)} characters)"


def ask_for_summary(name: str) -> Sample:
    return Sample(
        [types.SamplingMessage(role="user", content=types.TextContent(type="text", text=read(name)))],
        system_prompt="Summarize the user's note in one sentence.",
        max_tokens=80,
        temperature=0.0,
    )


@server.tool()
async def summarize_note(
    name: str,
    summary: Annotated[types.CreateMessageResult, Resolve(ask_for_summary)] = None,  # type: ignore[assignment]
) -> str:
    """A one-sentence summary of one note, written by the client's model."""
    text = summary.content.text if isinstance(summary.content, types.TextContent) else ""
    return f"{name}: {text.strip()}"


if __name__ == "__main__":
    server.run()
