"""localsample: answer MCP sampling requests offline with local GGUF models.

The library in a few names::

    from localsample import ChatMessage, GenerationRequest, Origin, Runtime

    runtime = Runtime()  # your settings and catalog, as the CLI uses them
    request = GenerationRequest(messages=[ChatMessage("user", "Name three fruits.")], max_tokens=64)
    answer = await runtime.answer(request, Origin(server="my-app", request_id="1"))
    print(answer.completion.text, answer.completion.stop_reason, answer.reason)
    runtime.close()

``Runtime.answer`` applies the same selection, limits, approval and audit as `serve`.
"""

__version__ = "0.1.0"

from localsample.errors import LocalsampleError
from localsample.generation import ChatMessage, Completion, GenerationRequest, Generator
from localsample.runtime import Answer, Origin, Runtime
from localsample.selection import Preferences

__all__ = [
    "Answer",
    "ChatMessage",
    "Completion",
    "GenerationRequest",
    "Generator",
    "LocalsampleError",
    "Origin",
    "Preferences",
    "Runtime",
    "__version__",
]
