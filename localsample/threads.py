"""How many threads llama.cpp decodes with while other work shares the cores.

llama.cpp's OpenMP team spin-waits for its slowest member at every step. When another
process takes one of the team's cores, a step can take 10-200x longer than on an idle
machine, while a team one thread smaller keeps going at a steady, slightly lower speed
(README, "Decode under contention"). Spinning less would bound that tail but costs 10-30%
of idle speed on every step, so instead the governor watches the wall time of decode
steps and changes the thread count only while steps are slow:

- the share of its cores the team got during the step: the process's CPU time over
  threads x wall time. Spinning counts as CPU time, so an idle machine gives about 1; a
  team with a thread waiting for a core gets less than ``STARVED``. This needs no
  baseline, so it also sees contention that was there from the start;
- a baseline per batch width (rows in the step, by powers of two): a low percentile of
  recent steps at the full thread count that were not slow;
- a step ``COLLAPSE`` times its baseline, or two of the last three starved or ``SLOW``
  times it, drops one thread (again later, down to one, while steps stay slow for the smaller team);
- while reduced, one step at the full count is tried after ``FIRST_PROBE`` seconds: if it
  is not slow the full team is back on trial for ``TRIAL`` steps, and one slow step in
  them drops it again. A drop within ``LAST_PROBE`` seconds of the full team's return
  doubles the wait before the next try (at most ``LAST_PROBE``); a full team that held
  that long starts again from ``FIRST_PROBE``.

It is pure bookkeeping (no llama.cpp calls), so the batcher applies what it returns.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

log = logging.getLogger("localsample")

SLOW = 2.5
"""A step this many times its baseline is slow (noise and a growing context stay under)."""
STARVED = 0.6
"""A step whose team got less than this share of its cores' time was starved."""
COLLAPSE = 8.0
"""One step this many times its baseline drops a thread at once."""
RECENT = 3
"""Slow steps are counted over this many recent steps; two of them drop a thread."""
FIRST_PROBE = 2.0
"""Seconds on fewer threads before the full team is tried again."""
LAST_PROBE = 60.0
"""The longest wait between tries while they keep failing."""
TRIAL = 8
"""Steps the full team must run without a slow one, after a try, to be back for good."""
HISTORY = 32
"""Fast full-team steps kept per batch width for the baseline."""
MIN_HISTORY = 3
"""Steps needed before a batch width has a baseline."""


class ThreadGovernor:
    """Chooses the thread count step by step from decode timings (see the module doc)."""

    def __init__(self, full: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.full = full
        self.threads = full
        self.clock = clock
        self.fast: dict[int, deque[float]] = {}
        self.recent: deque[bool] = deque(maxlen=RECENT)
        self.probing = False
        self.reduced = full
        self.wait = FIRST_PROBE
        self.probe_at = 0.0
        self.trial = 0  # steps left in the full team's trial after a try
        self.full_since = float("-inf")  # when the full team last came back
        self.drops = 0  # times threads were dropped (stats, tests)

    @property
    def enabled(self) -> bool:
        return self.full > 1

    def baseline(self, rows: int) -> float | None:
        """The usual full-team time of a step of ``rows`` rows, once known."""
        times = self.fast.get(rows.bit_length())
        if times is None or len(times) < MIN_HISTORY:
            return None
        return sorted(times)[len(times) // 5]

    def observe(self, rows: int, seconds: float, cpu: float | None = None) -> int | None:
        """Record one decode step of ``rows`` rows, ``seconds`` long, in which the process
        used ``cpu`` seconds of CPU time (None: unknown); the new thread count when it
        changes."""
        if not self.enabled:
            return None
        base = self.baseline(rows)
        starved = cpu is not None and seconds > 0 and cpu < STARVED * self.threads * seconds
        if self.probing:
            self.probing = False
            return self._probed(not starved and (base is None or seconds < SLOW * base))
        if self.threads == self.full:
            if not starved and (base is None or seconds < SLOW * base):
                self.fast.setdefault(rows.bit_length(), deque(maxlen=HISTORY)).append(seconds)
            ratio = seconds / base if base is not None else 1.0
            if self.trial:
                return self._on_trial(ratio, starved)
            return self._judge(ratio, starved)
        ratio = seconds / (base * self.full / self.threads) if base is not None else 1.0  # fewer threads, scaled
        changed = self._judge(ratio, starved)
        if changed is not None:
            return changed
        if self.clock() >= self.probe_at:
            self.probing = True
            return self.full
        return None

    def _judge(self, ratio: float, starved: bool) -> int | None:
        self.recent.append(starved or ratio >= SLOW)
        if self.threads == 1 or not (ratio >= COLLAPSE or sum(self.recent) >= 2):
            return None
        return self._drop(ratio)

    def _drop(self, ratio: float, *, back: bool = False) -> int:
        """One thread fewer, or ``back`` to the reduced count a failed trial came from."""
        before = self.threads
        if not back:
            self.reduced = before - 1
        if before == self.full:  # contention that comes and goes: try less often
            held = self.clock() - self.full_since
            self.wait = min(LAST_PROBE, self.wait * 2) if held < LAST_PROBE else FIRST_PROBE
        self.threads = self.reduced
        self.trial = 0
        self.recent.clear()
        self.drops += 1
        self.probe_at = self.clock() + self.wait
        log.log(
            logging.DEBUG if back else logging.INFO,
            "decode steps slowed by other work on the cores: llama.cpp threads %d -> %d (step %.1fx usual)",
            before,
            self.threads,
            ratio,
        )
        return self.threads

    def _on_trial(self, ratio: float, starved: bool) -> int | None:
        self.trial -= 1
        if starved or ratio >= SLOW:
            return self._drop(ratio, back=True)
        if not self.trial:
            log.info("decode steps back to usual speed: llama.cpp threads %d -> %d", self.reduced, self.full)
        return None

    def _probed(self, fine: bool) -> int | None:
        if fine:
            self.threads = self.full
            self.full_since = self.clock()
            self.trial = TRIAL
            self.recent.clear()
            return None  # the full count is already in place for the try
        self.wait = min(LAST_PROBE, self.wait * 2)
        self.probe_at = self.clock() + self.wait
        log.debug("the full thread team is still slow; next try in %.0f s", self.wait)
        return self.reduced
