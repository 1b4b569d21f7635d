"""Every socket mode a dialplan can choose, through the real master and workers.

``socket host:port async full``, ``async`` (single-channel: no linger/api/bgapi/event) and static
(``full`` without ``async``: sendmsg replies only after the app ran, no CHANNEL_HANGUP_COMPLETE).
The simulator plays FreeSWITCH's behaviour in each, as captured from a real FreeSWITCH 1.11.2.
"""

import pytest

from gateway.protocol import SOCKET_MODES
from gateway.simulator import CallOptions, run_load


@pytest.mark.parametrize("mode", SOCKET_MODES)
def test_example_ivr_in_every_socket_mode(start_gateway, mode):
    """The bundled example app finishes every call correctly whatever the socket mode."""
    socket_mode, control = SOCKET_MODES[mode]
    gateway = start_gateway(app="gateway.examples.ivr:handle", workers=2)
    result = run_load(gateway.address, calls=100, rate=100, seed=11,
                      options=CallOptions(socket_mode=socket_mode, control=control,
                                          playback_ms=20))
    counts = result.counts()
    assert counts["completed"] == 100, (counts, result.failures()[:3])
    first = result.results[0].commands
    assert first[:2] == ["connect", "linger 10" if control == "full" else "myevents"]
    warnings = gateway.log().count("lacks `full`")
    if control == "full":
        assert warnings == 0
    else:
        # One warning per worker process, however many calls it served.
        assert 1 <= warnings <= 2
    assert "Traceback" not in gateway.log()


@pytest.mark.parametrize("mode, calls", [("async full", 1000), ("async", 500),
                                         ("static", 500)])
def test_hangup_at_every_point_of_a_call(start_gateway, mode, calls):
    """Callers hang up at random points (before connect, between commands, during an execute,
    after the linger): every call ends within its linger time, every handler returns, no worker
    dies."""
    socket_mode, control = SOCKET_MODES[mode]
    gateway = start_gateway(workers=2)
    pids = sorted(gateway.worker_pids())
    linger_cap = 0.2
    result = run_load(gateway.address, calls=calls, rate=300, seed=12,
                      options=CallOptions(scenario="hangup-race", socket_mode=socket_mode,
                                          control=control, hangup_after_ms=(0, 25),
                                          playback_ms=5, linger_cap=linger_cap,
                                          call_deadline=10))
    counts = result.counts()
    print(f"\n{mode} hangup races:", counts)
    assert counts["completed"] == calls, result.failures()[:3]
    # The hangup comes within 25 ms, FreeSWITCH lingers at most linger_cap, and the gateway
    # must close promptly after that; 1 s is a wide margin for a loaded 2-core machine.
    assert max(r.duration_ms for r in result.results) < (0.025 + linger_cap + 1.0) * 1000
    records = gateway.wait_handlers_returned()
    assert records and max(seconds for *_, seconds in records) < 2.0
    statuses = {status for _, _, status, _ in records}
    assert statuses <= {"ok", "CallHungUp", "SessionClosed"}, statuses
    assert sorted(gateway.worker_pids()) == pids, "no worker died"
    assert "Traceback" not in gateway.log()
