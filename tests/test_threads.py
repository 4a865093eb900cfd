"""The thread governor's decisions, from step timings (threads.py; no model needed).

Its effect on real decoding under contention is measured by scripts/bench_contention.py.
"""

from __future__ import annotations

import logging

import pytest

from localsample.catalog import LoadSettings
from localsample.slots import ContextSettings
from localsample.threads import FIRST_PROBE, LAST_PROBE, TRIAL, ThreadGovernor

STEP = 0.016  # an idle one-row step


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def warmed(full: int = 4) -> tuple[ThreadGovernor, Clock]:
    clock = Clock()
    governor = ThreadGovernor(full, clock=clock)
    for _ in range(10):
        assert governor.observe(1, STEP) is None
    return governor, clock


def test_steady_steps_keep_every_thread() -> None:
    governor, _ = warmed()
    for seconds in [STEP * 1.3, STEP * 0.9, STEP * 2.0, STEP] * 20:
        assert governor.observe(1, seconds) is None
    assert governor.threads == 4
    assert governor.drops == 0


def test_one_collapsed_step_drops_a_thread_at_once(caplog: pytest.LogCaptureFixture) -> None:
    governor, _ = warmed()
    with caplog.at_level(logging.INFO, logger="localsample"):
        assert governor.observe(1, STEP * 50) == 3
    assert "llama.cpp threads 4 -> 3" in caplog.text


def test_two_slow_steps_of_three_drop_a_thread_one_does_not() -> None:
    governor, _ = warmed()
    assert governor.observe(1, STEP * 3) is None
    assert governor.observe(1, STEP) is None
    assert governor.observe(1, STEP * 3) == 3


def test_no_decision_before_a_width_has_a_baseline() -> None:
    governor, _ = warmed()
    # 8 rows: a width never seen, so a slow-looking first step is not judged
    assert governor.observe(8, STEP * 20) is None
    assert governor.threads == 4


def test_still_slow_on_fewer_threads_drops_again_down_to_one() -> None:
    governor, _ = warmed(full=3)
    assert governor.observe(1, STEP * 40) == 2
    # two threads are expected at 1.5x the full team's time; 40x is still slow
    assert governor.observe(1, STEP * 40) == 1
    assert governor.observe(1, STEP * 40) is None  # never below one
    assert governor.threads == 1


def test_fewer_threads_at_their_expected_speed_stay() -> None:
    governor, _ = warmed(full=2)
    assert governor.observe(1, STEP * 40) == 1
    for _ in range(50):  # one thread: about twice the full team's time, as expected
        assert governor.observe(1, STEP * 2.2) is None
    assert governor.threads == 1


def test_the_full_team_is_tried_again_and_kept_after_a_clean_trial(caplog: pytest.LogCaptureFixture) -> None:
    governor, clock = warmed(full=2)
    assert governor.observe(1, STEP * 40) == 1
    clock.now += FIRST_PROBE
    assert governor.observe(1, STEP * 2) == 2  # the try: one step on the full team
    with caplog.at_level(logging.INFO, logger="localsample"):
        for _ in range(TRIAL + 20):
            assert governor.observe(1, STEP) is None
    assert governor.threads == 2
    assert "back to usual speed: llama.cpp threads 1 -> 2" in caplog.text


def test_a_slow_step_in_the_trial_goes_back_at_once_and_waits_longer() -> None:
    governor, clock = warmed(full=3)
    assert governor.observe(1, STEP * 40) == 2
    clock.now += FIRST_PROBE
    assert governor.observe(1, STEP * 1.4) == 3
    assert governor.observe(1, STEP) is None
    assert governor.observe(1, STEP * 3) == 2  # one slow step on trial: back to two, not one
    assert governor.wait == FIRST_PROBE * 2
    clock.now += FIRST_PROBE  # not yet: the wait doubled
    assert governor.observe(1, STEP * 1.4) is None


def test_a_failed_try_goes_back_and_waits_twice_as_long_up_to_a_bound() -> None:
    governor, clock = warmed(full=2)
    assert governor.observe(1, STEP * 40) == 1
    wait = FIRST_PROBE
    for _ in range(8):
        clock.now += wait - 0.01
        assert governor.observe(1, STEP * 2) is None  # not yet
        clock.now += 0.01
        assert governor.observe(1, STEP * 2) == 2  # try the full team
        assert governor.observe(1, STEP * 30) == 1  # still slow: back
        wait = min(LAST_PROBE, wait * 2)
    assert governor.wait == LAST_PROBE
    # a passed trial keeps the wait; a full team that then holds LAST_PROBE seconds resets it
    clock.now += LAST_PROBE
    assert governor.observe(1, STEP * 2) == 2
    for _ in range(TRIAL + 1):  # the try's own step, then the trial
        assert governor.observe(1, STEP) is None
    assert governor.wait == LAST_PROBE
    clock.now += LAST_PROBE
    assert governor.observe(1, STEP * 50) == 1
    assert governor.wait == FIRST_PROBE and governor.probe_at == clock.now + FIRST_PROBE


def test_a_starved_team_drops_a_thread_even_without_a_baseline() -> None:
    governor = ThreadGovernor(2, clock=Clock())
    # contention from the start: every step is slow, so no "usual" time is known, but the
    # team got a fifth of its cores' time (CPU time over threads x wall time)
    assert governor.observe(1, 3.0, cpu=1.2) is None
    assert governor.observe(1, 3.0, cpu=1.2) == 1
    assert governor.baseline(1) is None  # starved steps never become the usual time


def test_a_team_that_has_its_cores_is_not_starved() -> None:
    governor, _ = warmed()
    for _ in range(20):
        assert governor.observe(1, STEP, cpu=STEP * 4 * 0.97) is None  # spinning counts as CPU time
    assert governor.threads == 4


def test_slow_full_team_steps_do_not_raise_the_baseline() -> None:
    governor, _ = warmed()
    before = governor.baseline(1)
    governor.observe(1, STEP * 3)
    assert governor.baseline(1) == before


def test_one_thread_has_nothing_to_govern() -> None:
    governor = ThreadGovernor(1)
    for _ in range(10):
        assert governor.observe(1, STEP) is None
    assert governor.observe(1, STEP * 100) is None


def test_the_catalog_switch_reaches_the_context_but_not_llama() -> None:
    load = LoadSettings(adaptive_threads=False)
    assert "adaptive_threads" not in load.llama_kwargs()
    assert ContextSettings.from_load(load.context_kwargs()).adaptive_threads is False
    assert ContextSettings.from_load(LoadSettings().context_kwargs()).adaptive_threads is True
