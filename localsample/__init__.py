"""localsample: answer MCP sampling requests offline with local GGUF models."""

__version__ = "0.1.0"
