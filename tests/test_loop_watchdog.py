"""The loop watchdog's timing, on a simulated clock (workers.loop_watchdog): every stall of 1.25
thresholds is reported once, at most 1.25 thresholds after it began; no stall shorter than 0.75
thresholds is; an idle loop costs about three wake-ups per threshold."""

import types

import pytest

from workers import loop_watchdog

THRESHOLD = 1.0


def simulate(monkeypatch, stall_start: float, stall_length: float, until: float):
    """A watchdog whose loop stamps on its timer, except while it is stalled (an overdue stamp
    comes as the stall ends); returns the watchdog, the times of its reports and of its looks."""
    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(loop_watchdog, "time", types.SimpleNamespace(monotonic=lambda: clock.now))
    reports = []
    monkeypatch.setattr(loop_watchdog.LoopWatchdog, "_report",
                        lambda self, stalled: reports.append(clock.now))
    watchdog = loop_watchdog.LoopWatchdog(THRESHOLD)
    stall_end = stall_start + stall_length
    stamps = [k * watchdog.period for k in range(1, int(until / watchdog.period) + 1)]
    stamps = sorted({t for t in stamps if not stall_start <= t < stall_end} | {stall_end})
    looks, next_look = [], 0.0
    for stamp in [*(t for t in stamps if t < until), until]:
        while next_look < stamp:   # the thread looks before the loop's next stamp
            clock.now = next_look
            looks.append(next_look)
            next_look += watchdog.look()
        clock.now = stamp
        watchdog._tick()
    return watchdog, reports, looks


@pytest.mark.parametrize("length", [1.25, 1.6, 4.0])
@pytest.mark.parametrize("start", [2.0, 2.13, 2.25, 2.37, 2.49])
def test_a_stall_of_one_and_a_quarter_thresholds_is_reported_once_in_time(monkeypatch, start,
                                                                          length):
    watchdog, reports, _ = simulate(monkeypatch, start, length, until=10.0)
    assert len(reports) == 1 and start < reports[0] <= start + 1.25 * THRESHOLD + 1e-9
    assert THRESHOLD <= watchdog.longest_block <= length + 0.25 * THRESHOLD


@pytest.mark.parametrize("length", [0.3, 0.6, 0.74])
@pytest.mark.parametrize("start", [2.0, 2.13, 2.25, 2.37, 2.49])
def test_a_stall_under_three_quarters_of_the_threshold_is_not_reported(monkeypatch, start,
                                                                      length):
    watchdog, reports, _ = simulate(monkeypatch, start, length, until=10.0)
    assert reports == [] and watchdog.longest_block == 0.0


def test_an_idle_loop_is_looked_at_once_per_threshold(monkeypatch):
    _, reports, looks = simulate(monkeypatch, 100.0, 0.0, until=100.0)
    assert reports == [] and 95 <= len(looks) <= 105
