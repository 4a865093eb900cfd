"""A stdio "server" that reads every message and never answers, not even the handshake.

Stands for a server that hangs at start-up. By default it exits when its stdin closes,
as a stdio server should. With ``--close-stdout`` it closes its stdout at once, ignores
SIGTERM and stays alive until killed: a server whose output is gone but whose process
lingers.
"""

from __future__ import annotations

import os
import signal
import sys
import time

if __name__ == "__main__":
    if "--close-stdout" in sys.argv[1:]:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sys.stdout.flush()
        os.close(1)
        while True:
            time.sleep(1)
    for _line in sys.stdin:
        pass
