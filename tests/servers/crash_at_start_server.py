"""A stdio server that dies during start-up: it writes some log lines and a traceback
ending in ``ModuleNotFoundError: No module named 'mcp'`` to stderr, then exits with status 1."""

import sys

for number in range(30):
    print(f"starting, step {number}", file=sys.stderr)
raise ModuleNotFoundError("No module named 'mcp'")
