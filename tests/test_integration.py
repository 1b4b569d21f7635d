"""The real master, real workers, real TCP: calls offered by the FreeSWITCH simulator, counted."""

import os
import random
import signal
import socket
import time

import gevent
import pytest

from gateway.simulator import CallOptions, SimulatedCall, run_load
from tests.gateway_process import wait_until


def assert_all_completed(result):
    counts = result.counts()
    assert counts["completed"] == len(result.results), (counts, result.failures()[:5])


def test_500_calls_through_two_workers(start_gateway):
    """Every call offered to a running gateway completes: 0 refused, 0 reset, all served."""
    gateway = start_gateway(workers=2)
    result = run_load(gateway.address, calls=500, rate=150, seed=1)
    assert_all_completed(result)
    assert result.counts()["refused"] == result.counts()["reset"] == 0
    records = gateway.wait_handlers_returned()
    assert len(records) == 500 and all(status == "ok" for _, _, status, _ in records)
    served_by = {r.served_by for r in result.results}
    assert served_by == set(gateway.worker_pids()), "both workers accept from the shared socket"
    print("\n500 calls:", result.summary())


def test_sigkill_a_worker_every_half_second(start_gateway):
    """Killed workers are replaced while the kernel queues new calls: 0 refused, 0 timeouts.

    The only failures allowed are calls that were in flight on a worker at the moment it was
    killed: attributed by the worker pid the app reported, or, for a call killed before its
    handler could report, by its failure following a kill within a second.
    """
    gateway = start_gateway(workers=2)
    kills: list[tuple[float, int]] = []

    def killer():
        rng = random.Random(7)
        for _ in range(20):
            gevent.sleep(0.5)
            pid = rng.choice(gateway.worker_pids())
            kills.append((time.monotonic(), pid))
            os.kill(pid, signal.SIGKILL)

    killing = gevent.spawn(killer)
    # Calls of ~100 ms offered at 60/s for 11 s: several are always in flight.
    result = run_load(gateway.address, calls=660, rate=60, seed=2,
                      options=CallOptions(playback_ms=100))
    killing.get()
    counts = result.counts()

    def killed_in_flight(call):
        """The call failed right after the worker serving it (if it got to say) was killed."""
        return any(0 <= call.ended_at - at < 1.0 and call.served_by in (None, pid)
                   for at, pid in kills)

    unexplained = [call for call in result.failures() if not killed_in_flight(call)]
    print("\nchaos:", counts, f"kills={len(kills)}")
    assert len(kills) == 20
    assert counts["refused"] == 0 and counts["timeout"] == 0 and counts["protocol_error"] == 0
    assert not unexplained, unexplained[:5]
    gateway.wait_for_log(r"was killed by signal 9 \(SIGKILL\)", count=20)
    gateway.wait_for_log(r"ready, generation", count=22)
    assert gateway.proc.poll() is None


def test_hangup_race_1000_calls(start_gateway):
    """Callers hanging up 0-2 ms after connecting never leave a handler waiting or kill a worker."""
    gateway = start_gateway(workers=2)
    pids = sorted(gateway.worker_pids())
    result = run_load(gateway.address, calls=1000, rate=250, seed=3,
                      options=CallOptions(scenario="hangup-race", hangup_after_ms=(0, 2),
                                          call_deadline=10))
    counts = result.counts()
    print("\nhangup race:", counts)
    assert counts["completed"] == 1000, result.failures()[:5]
    # Every handler that started has returned, and promptly.
    records = gateway.wait_handlers_returned()
    assert records and max(seconds for *_, seconds in records) < 5.0
    assert sorted(gateway.worker_pids()) == pids, "no worker died"
    assert "Traceback" not in gateway.log()


@pytest.mark.parametrize("args, outcome, cause", [
    ((), "completed", "TEMPORARY_FAILURE"),                       # the default
    (("--on-handler-error", "hangup:USER_BUSY"), "completed", "USER_BUSY"),
    (("--on-handler-error", "dialplan"), "early_close", None),    # the dialplan goes on
])
def test_handler_exception_ends_only_that_call(start_gateway, args, outcome, cause):
    """An exception in a handler is logged with its traceback, and its call ends as
    --on-handler-error says (hung up with a cause, or handed back to the dialplan); the worker
    serves on."""
    gateway = start_gateway(app="reporting_ivr:handle_raising", workers=1, args=args)
    pids = gateway.worker_pids()
    result = run_load(gateway.address, calls=20, rate=50)
    assert [(r.outcome, r.hangup_cause) for r in result.results] == [(outcome, cause)] * 20
    gateway.wait_for_log(r"RuntimeError: deliberate failure in call", count=20)
    assert gateway.worker_pids() == pids


def test_graceful_stop_finishes_calls_in_flight(start_gateway):
    """TERM: workers stop accepting, finish their calls; the master exits 0 and unbinds."""
    gateway = start_gateway(workers=2)
    calls = [SimulatedCall(gateway.address, CallOptions(playback_ms=1500), random.Random(i))
             for i in range(20)]
    running = [gevent.spawn(call.run) for call in calls]
    wait_until(lambda: all(c.running_app and c.running_app[0] == "playback" for c in calls),
               timeout=10)
    gateway.signal(signal.SIGTERM)
    results = [greenlet.get(timeout=30) for greenlet in running]
    assert gateway.wait_exit(15) == 0
    assert [r.outcome for r in results] == ["completed"] * 20, results[:3]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(gateway.address, timeout=2)


def test_unimportable_app_fails_before_binding(start_gateway):
    """A broken app stops `run` with the import error, before any port is bound."""
    gateway = start_gateway(app="broken_import:handle", wait_ready=False)
    assert gateway.wait_exit(30) != 0
    log = gateway.log()
    assert "ImportError: deliberately broken app module" in log
    assert "Listening at" not in log

