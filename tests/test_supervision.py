"""No failure of a worker or a call ever reaches FreeSWITCH as a refused connection.

Real master, real workers, real signals and faults; every call counted by the simulator.
"""

import ctypes
import os
import random
import re
import signal
import socket
import time
from datetime import datetime
from pathlib import Path

import gevent
import pytest

from gateway.backoff import RespawnBackoff
from gateway.loadtest import offer
from gateway.simulator import CallOptions, SimulatedCall, run_load
from tests.gateway_process import wait_until

PR_SET_CHILD_SUBREAPER = 36


def start_calls(address, count, playback_ms):
    """Calls that are all inside a playback when this returns."""
    calls = [SimulatedCall(address, CallOptions(playback_ms=playback_ms), random.Random(i))
             for i in range(count)]
    running = [gevent.spawn(call.run) for call in calls]
    wait_until(lambda: all(c.running_app and c.running_app[0] == "playback" for c in calls), 10,
               "every call in its playback")
    return calls, running


def log_times(gateway, pattern):
    """Timestamps of the log lines matching ``pattern``."""
    stamps = []
    for line in gateway.log().splitlines():
        if re.search(pattern, line):
            stamps.append(datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return stamps


@pytest.mark.parametrize("rate, exit_code, survival", [
    (200, 1, "off"), (500, 1, "off"), (200, 3, "off"), (200, 1, "on"), (500, 1, "on")])
def test_a_sporadic_crash_costs_only_the_calls_in_flight(start_gateway, rate, exit_code,
                                                         survival):
    """1 % of calls kill their worker with os._exit, 10 % raise, at production rates for 10 s:
    nothing is refused or times out, first bytes stay fast, every raising call is hung up, and
    no slot is ever taken for a crash loop: each worker completed calls before it died.
    os._exit(3) is a crash like any other, not a boot error. Without call survival every failed
    call was in flight on a worker that died; with it, every call completes: the calls of a
    dead worker are taken over by a live one and hung up (--orphan-action)."""
    gateway = start_gateway(app="faulty:handle", workers=2,
                            args=["--call-survival", survival],
                            env={"FAULTY_EXIT_CODE": str(exit_code)})
    result = offer(gateway.address, calls=rate * 10, rate=rate, procs=2,
                   options=CallOptions(playback_ms=0))
    counts = result.counts()
    view = gateway.stats()
    deaths = [e for e in view["exits"] if e["classification"] != "drained"]
    died = {e["pid"] for e in deaths}
    first_byte_p99 = result.percentile("first_byte_ms", 0.99)
    print(f"\nsporadic crash at {rate}/s, exit {exit_code}, survival {survival}:", counts,
          f"first byte p99 {first_byte_p99:.1f} ms, {len(died)} deaths,",
          f"{view['totals']['calls_lost']} calls lost and {view['totals']['calls_orphaned']}",
          f"orphaned by the gateway's count, {view['totals']['calls_per_death']} completed",
          "per death")
    assert counts["refused"] == counts["timeout"] == counts["protocol_error"] == 0
    # At 500 calls/s this 2-core machine runs the generator and the gateway at about 1.5 cores,
    # and the p99 swings (12 to 39 ms in six runs alone, 119 ms once inside the whole suite):
    # the benchmark measures the 50 ms target five times; here 250 ms is a bound that a slot
    # lost to a backoff (1 s at least) blows through.
    assert first_byte_p99 <= (50 if rate <= 200 else 250)
    assert died and {e["classification"] for e in deaths} == {"crashed"}, deaths[:3]
    assert all(e["exit_code"] == exit_code and "without a word" in e["detail"] for e in deaths)
    # Every call that failed was in flight on a worker that died: the gateway counted at least
    # them (a call whose hangup had gone out when its worker died completes all the same).
    failed = result.failures()
    assert {call.outcome for call in failed} <= {"early_close", "reset"}, failed[:3]
    assert len(failed) <= view["totals"]["calls_lost"]
    if survival == "on":
        totals = view["totals"]
        taken = {key: totals[key] for key in ("calls_orphaned", "calls_orphaned_now",
                                              "resumed_fallback", "resumed_gone",
                                              "resumed_failed", "calls_lost")}
        assert not failed and totals["calls_lost"] == 0, taken
        # Each orphaning ended in one of these, unless the worker it was given to died first
        # (then the call was orphaned once more, and counted again).
        assert 0 < totals["resumed_fallback"] + totals["resumed_gone"] <= \
            totals["calls_orphaned"], taken
    # Raising calls and orphaned ones are hung up with TEMPORARY_FAILURE, the others normally
    # (a raising call on a worker that died before its hangup went out was orphaned too).
    survivors = [r for r in result.results if r.outcome == "completed"]
    assert all(r.hangup_cause in ("NORMAL_CLEARING", "TEMPORARY_FAILURE") for r in survivors)
    totals = view["totals"]
    failures = sum(r.hangup_cause == "TEMPORARY_FAILURE" for r in survivors)
    assert totals["handler_exceptions"] - totals["calls_lost"] - totals["calls_orphaned"] <= \
        failures <= totals["handler_exceptions"] + totals["resumed_fallback"]
    # Every death was replaced at once: never a crash loop, however often workers died.
    assert "crash-looping" not in gateway.log()
    assert all(slot["unserved_in_a_row"] <= 1 for slot in view["slots"])
    assert view["totals"]["worker_deaths"] == len(died)
    assert gateway.proc.poll() is None


def test_sys_exit_in_a_handler_drains_its_worker(start_gateway):
    """sys.exit(7) in a handler ends that call as any handler failure does; its worker stops
    accepting, finishes its other calls and exits with 7, said by the worker (app_exit), and is
    replaced at once."""
    gateway = start_gateway(app="faulty:handle_sys_exit", workers=1)
    [worker] = gateway.worker_pids()
    calls, running = start_calls(gateway.address, 3, playback_ms=1000)
    (gateway.workdir / "exit-once").touch()
    exiting = SimulatedCall(gateway.address, CallOptions(), random.Random(9)).run()
    assert (exiting.outcome, exiting.hangup_cause) == ("completed", "TEMPORARY_FAILURE")
    assert [g.get(timeout=15).outcome for g in running] == ["completed"] * 3
    gateway.wait_for_log(rf"worker 1 \(pid {worker}, gen 1\) exited with code 7: the app "
                         r"called sys.exit\(\)")
    [exit] = [e for e in gateway.stats()["exits"] if e["pid"] == worker]
    assert (exit["classification"], exit["exit_code"]) == ("app_exit", 7)
    assert "SystemExit: 7" in "\n".join(exit["traceback"])
    assert run_load(gateway.address, calls=20, rate=50).counts()["completed"] == 20


def test_a_crash_on_every_call_is_a_crash_loop(start_gateway):
    """Workers that die on their first call never serve: their slots back off (1 s, 1.5 s ...),
    are reported as crash-looping with the reason and the next attempt, and the master stays
    idle; the port stays bound (calls wait or fail, none is refused). The calls of the dead
    workers are hung up by the next worker up (--orphan-action), and that proves nothing of the
    app: no loop ends on it."""
    gateway = start_gateway(app="faulty:handle_crash_always", workers=2,
                            args=["--spare-workers", "0"])

    def in_backoff():   # a slot waiting for its next attempt, seen while the calls arrive
        return [slot for slot in gateway.stats()["slots"] if slot["state"] == "backoff"
                and slot["next_attempt_in_s"] > 0 and slot["crash_loop"]]

    watching = gevent.spawn(wait_until, in_backoff, 15, "a slot in backoff", 0.1)
    master_cpu, started = gateway.cpu_seconds(), time.monotonic()
    result = run_load(gateway.address, calls=60, rate=10, seed=31,
                      options=CallOptions(connect_wait=3))
    elapsed = time.monotonic() - started
    waiting = watching.get(timeout=15)
    gateway.wait_for_log(r"slot \d of generation 1 is crash-looping: 3 workers in a row ended "
                         r"before completing a call \(the last exited with code 1 without a word")
    view = gateway.stats()
    print("\ncrash on every call:", result.counts(), [(s["slot"], s["unserved_in_a_row"],
                                                      s["next_attempt_in_s"]) for s in waiting])
    assert result.counts()["refused"] == 0
    completed = [r for r in result.results if r.outcome == "completed"]
    assert all(r.hangup_cause == "TEMPORARY_FAILURE" for r in completed)
    assert all("without a word" in slot["crash_loop"] for slot in waiting)
    # Every call the workers completed was an orphan they hung up, none one the app served.
    assert sum(slot["calls_completed"] for slot in view["slots"]) <= \
        view["totals"]["resumed_fallback"]
    assert gateway.cpu_seconds() - master_cpu < 0.05 * elapsed + 0.2
    status, body = gateway.http_get("/metrics")
    assert b"esl_gateway_slot_unserved_deaths{" in body


class MemoryCgroup:
    """A memory cgroup of the test's own (cgroup v1 or v2), to let the kernel's OOM killer end
    one worker for real."""

    def __init__(self, limit_bytes: int):
        v2 = Path("/sys/fs/cgroup/cgroup.controllers")
        name = f"esl-gateway-test-{os.getpid()}"
        if v2.exists() and "memory" in v2.read_text().split():
            self.path, limit_file = Path("/sys/fs/cgroup") / name, "memory.max"
        elif Path("/sys/fs/cgroup/memory/cgroup.procs").exists():
            self.path, limit_file = Path("/sys/fs/cgroup/memory") / name, "memory.limit_in_bytes"
        else:
            pytest.skip("no memory cgroup controller here")
        try:
            self.path.mkdir()
            (self.path / limit_file).write_text(str(limit_bytes))
        except OSError as exc:
            pytest.skip(f"cannot make a memory cgroup here: {exc}")

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        self.path.rmdir()


def test_an_oom_kill_is_classified_as_such(start_gateway):
    """A worker the kernel's OOM killer ends (a leak in one call, inside a 256 MiB cgroup) is
    reported as oom_killed, not as an operator's SIGKILL, and is replaced at once."""
    gateway = start_gateway(app="faulty:handle_hog", workers=1)
    [worker] = gateway.worker_pids()
    cgroup = MemoryCgroup(256 * 2**20)
    try:
        cgroup.add(worker)
        (gateway.workdir / "hog-once").touch()
        hogging = SimulatedCall(gateway.address, CallOptions(), random.Random(3)).run()
        # Its call outlives it: the replacement hangs it up (--orphan-action).
        assert (hogging.outcome, hogging.hangup_cause) == ("completed", "TEMPORARY_FAILURE")
        gateway.wait_for_log(rf"worker 1 \(pid {worker}, gen 1\) was killed by SIGKILL while the "
                             r"kernel's OOM killer ran")
    finally:
        wait_until(lambda: not Path(f"/proc/{worker}").exists(), 10, "the hog gone")
        cgroup.remove()
    [exit] = [e for e in gateway.stats()["exits"] if e["pid"] == worker]
    assert (exit["classification"], exit["signal"]) == ("oom_killed", signal.SIGKILL)
    assert run_load(gateway.address, calls=10, rate=50).counts()["completed"] == 10


def test_blocked_worker_is_replaced_with_its_stack_logged(start_gateway):
    """A handler that blocks the event loop past --timeout gets its worker killed and replaced;
    the blocking stack reaches the log; the other worker serves on, and hangs up the blocked
    call (--orphan-action)."""
    gateway = start_gateway(app="faulty:handle_blocking", workers=2, args=["--timeout", "2"])
    (gateway.workdir / "block-once").touch()
    blocked = gevent.spawn(SimulatedCall(gateway.address, CallOptions(), random.Random(1)).run)
    gateway.wait_for_log(r"event loop is blocked; aborting it", timeout=15)
    gateway.wait_for_log(r"was killed as hung \(SIGABRT\)", timeout=10)
    gateway.wait_for_log(r"ready, generation", count=3)
    log = gateway.log()
    assert "spin_without_yielding" in log          # the watchdog's report and faulthandler
    blocked = blocked.get(timeout=10)   # its call outlived its worker, hung up by the other one
    assert (blocked.outcome, blocked.hangup_cause) == ("completed", "TEMPORARY_FAILURE")
    result = run_load(gateway.address, calls=50, rate=50)
    assert result.counts()["completed"] == 50


def test_a_stalled_loop_is_reported_with_its_stack_and_measured(start_gateway):
    """A loop blocked for 1.5 s (under --timeout) is not killed, but its stack reaches the log at
    once and the stall shows in the worker's stats."""
    gateway = start_gateway(app="faulty:handle_blocking", workers=1, args=["--timeout", "10"])
    pid = gateway.worker_pids()[0]
    (gateway.workdir / "block-once").write_text("1.5")
    result = run_load(gateway.address, calls=1)
    assert result.counts()["completed"] == 1
    gateway.wait_for_log(r"event loop blocked for 1\.\ds")
    report = gateway.log().split("event loop blocked for", 1)[1]
    assert "spin_without_yielding" in report and "handle_blocking" in report
    def worker_view():
        return next(w for w in gateway.stats()["workers"] if w["pid"] == pid)
    wait_until(lambda: worker_view()["longest_block_ms"] >= 1000, 5, "the stall in the stats")
    assert worker_view()["longest_block_ms"] < 2500
    assert gateway.worker_pids() == [pid]


def test_slow_io_is_not_a_hung_worker(start_gateway):
    """A handler waiting on I/O for longer than --timeout keeps its worker alive."""
    gateway = start_gateway(app="faulty:handle_slow_io", workers=1, args=["--timeout", "1"])
    pids = gateway.worker_pids()
    result = run_load(gateway.address, calls=3, concurrency=3)
    assert result.counts()["completed"] == 3
    assert gateway.worker_pids() == pids
    assert "blocked" not in gateway.log()


def test_crash_loop_backs_off_while_the_other_worker_serves(start_gateway):
    """A slot whose new workers die at boot is respawned with growing delays (1 s, 1.5 s,
    2.25 s ...), the master stays idle, the port stays bound and the other slot serves."""
    gateway = start_gateway(app="crashloop:handle", workers=2, args=["--spare-workers", "0"])
    (gateway.workdir / "crash-on-boot").touch()
    master_cpu = gateway.cpu_seconds()
    os.kill(gateway.worker_pids()[0], signal.SIGKILL)
    started = time.monotonic()
    # Meanwhile calls keep coming, and the surviving worker takes every one of them.
    calls = gevent.spawn(run_load, gateway.address, 200, 25, None, CallOptions(), 22)
    gateway.wait_for_log(r"could not load the app", count=5, timeout=30)
    elapsed = time.monotonic() - started
    result = calls.get(timeout=30)
    assert result.counts()["completed"] == 200, result.counts()
    deaths = log_times(gateway, r"gen 1\) could not load the app")
    gaps = [b - a for a, b in zip(deaths, deaths[1:])]
    print("\ncrash loop gaps:", [round(g, 2) for g in gaps])
    for gap, delay in zip(gaps, (0.0, 1.0, 1.5, 2.25)):
        assert delay <= gap < delay + 1.0, gaps
    gateway.wait_for_log(r"slot \d of generation 1 is crash-looping: 4 workers in a row")
    slot = next(s for s in gateway.stats()["slots"] if s["crash_loop"])
    assert "could not load the app" in slot["crash_loop"] and slot["unserved_in_a_row"] >= 4
    assert gateway.cpu_seconds() - master_cpu < 0.05 * elapsed + 0.2
    # Fixed deploy: the next attempt succeeds and the slot is back.
    (gateway.workdir / "crash-on-boot").unlink()
    gateway.wait_for_log(r"ready, generation", count=3, timeout=15)


@pytest.mark.parametrize("exits, expected", [
    # (app's fault, served[, a sibling served]) for each worker that left the slot
    ([(True, False)] * 6, [0.0, 1.0, 1.5, 2.25, 3.375, 5.0625]),
    ([(True, False)] * 14, [0.0] + [min(1.5 ** k, 30.0) for k in range(13)]),
    # A worker that served ends the loop; a kill from outside neither ends nor extends it.
    ([(True, False), (True, False), (True, True), (True, False)], [0.0, 1.0, 0.0, 0.0]),
    ([(True, False), (True, False), (False, False), (True, False)], [0.0, 1.0, 1.0, 1.5]),
    # Workers that served are replaced at once however often they die.
    ([(True, True)] * 20, [0.0] * 20),
    # So are those that died before serving while a sibling served: a sporadic crash, early.
    ([(True, False, True)] * 5 + [(True, False)] * 2, [0.0] * 6 + [1.0]),
])
def test_backoff_schedule(exits, expected):
    """Exponential, einhorn-style, capped at 30 s, for workers that die before serving."""
    backoff = RespawnBackoff()
    got = [backoff.vacated(1, app_fault=fault, served=served, now=100.0,
                           sibling_serves=bool(sibling))
           for fault, served, *sibling in exits]
    assert got == pytest.approx(expected)


def test_full_worker_leaves_calls_in_the_queue_for_others(start_gateway):
    """At --worker-connections a worker stops accepting; the call waits in the kernel queue and
    is served (never accepted-then-dropped) when a slot frees up."""
    gateway = start_gateway(workers=2, args=["--worker-connections", "2"])
    calls, running = start_calls(gateway.address, 4, playback_ms=1500)
    served = [c.result.served_by for c in calls]
    assert sorted(served.count(pid) for pid in set(served)) == [2, 2], served
    fifth = SimulatedCall(gateway.address, CallOptions(), random.Random(5))
    fifth_started = time.monotonic()
    fifth_result = gevent.spawn(fifth.run).get(timeout=20)
    first_ended = min(g.get(timeout=20).ended_at for g in running)
    assert fifth_result.outcome == "completed"
    assert fifth_started + fifth_result.first_byte_ms / 1000 >= first_ended - 0.05


def test_max_calls_recycles_workers_without_cutting_a_call(start_gateway):
    """--max-calls: a worker that has taken N calls drains and is replaced at once."""
    gateway = start_gateway(workers=2, args=["--max-calls", "20", "--max-calls-jitter", "5"])
    result = run_load(gateway.address, calls=300, rate=100, seed=23,
                      options=CallOptions(playback_ms=50))
    assert result.counts()["completed"] == 300, result.counts()
    served = [r.served_by for r in result.results]
    assert max(served.count(pid) for pid in set(served)) <= 25
    recycled = gateway.wait_for_log(r"exited cleanly \(recycled\)", count=10)
    print(f"\nmax-calls: {len(set(served))} workers served 300 calls, {len(recycled)}+ recycled")


def test_emfile_backs_off_without_spinning_or_unbinding(start_gateway):
    """Accept failing with EMFILE (a low RLIMIT_NOFILE) neither spins the CPU nor closes the
    listener: the extra calls wait in the queue and are served once descriptors free up."""
    # The example app opens no files: every descriptor the limit allows goes to calls.
    gateway = start_gateway(app="gateway.examples.ivr:handle", workers=1, max_open_files=40)
    worker = gateway.worker_pids()[0]
    calls = [SimulatedCall(gateway.address, CallOptions(playback_ms=2000), random.Random(i))
             for i in range(60)]
    running = [gevent.spawn(call.run) for call in calls]
    gateway.wait_for_log(r"accept failed: \[Errno 24\] Too many open files")
    cpu_before, wall_before = gateway.cpu_seconds(worker), time.monotonic()
    gevent.sleep(1.0)
    cpu_used = gateway.cpu_seconds(worker) - cpu_before
    results = [greenlet.get(timeout=30) for greenlet in running]
    outcomes = [r.outcome for r in results]
    print(f"\nEMFILE: worker CPU {cpu_used:.3f}s in {time.monotonic() - wall_before:.1f}s "
          f"while starved; outcomes {set(outcomes)}")
    assert cpu_used < 0.2
    assert outcomes == ["completed"] * 60
    assert len(re.findall(r"accept failed", gateway.log())) <= 3   # rate-limited
    assert gateway.worker_pids() == [worker]


def test_ttin_ttou_add_and_drain_a_worker(start_gateway):
    """TTIN adds a worker; TTOU retires one, which drains its calls before leaving."""
    gateway = start_gateway(workers=1)
    gateway.signal(signal.SIGTTIN)
    gateway.wait_for_log(r"ready, generation", count=2)
    assert len(gateway.worker_pids()) == 2
    calls, running = start_calls(gateway.address, 6, playback_ms=800)
    gateway.signal(signal.SIGTTOU)
    gateway.wait_for_log(r"exited cleanly \(drained\)", timeout=15)
    assert [g.get(timeout=15).outcome for g in running] == ["completed"] * 6
    assert len(gateway.worker_pids()) == 1


def test_a_stop_signal_while_a_worker_boots_reaches_its_stop(start_gateway):
    """SIGTERM to a worker still booting (a reload right after a respawn) waits until its
    handlers are in place, then makes it drain and leave cleanly; it is not killed by the
    signal's default action (nor swallowed by the master's handler, inherited across fork).
    A worker forked by the fork server boots in a few milliseconds, so the signal may land after
    it is ready: the test tries again until one landed before."""
    gateway = start_gateway(workers=1, args=["--spare-workers", "0"])
    for attempt in range(10):
        [first] = gateway.worker_pids()
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not (booting := [pid for pid in gateway.worker_pids() if pid != first]):
            assert time.monotonic() < deadline, "no replacement forked"
            time.sleep(0.0005)   # catch it just after fork(), before it is ready
        os.kill(booting[0], signal.SIGTERM)
        sent_at = time.time()
        gateway.wait_for_log(rf"\(pid {booting[0]}, gen 1\) exited cleanly \(drained\)")
        assert f"pid {booting[0]}, gen 1) was killed" not in gateway.log()
        [ready_at] = log_times(gateway, rf"\(pid {booting[0]}\) ready")
        if sent_at < ready_at:   # the signal came while it booted
            break
        gateway.wait_for_log(r"ready, generation", count=2 * attempt + 3)
    else:
        pytest.fail("the signal never reached a worker before it was ready")


def test_master_death_workers_finish_calls_then_unbind(start_gateway):
    """If the master dies, workers stop accepting, finish their calls and exit: no orphan keeps
    serving the port unsupervised."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0   # adopt (and reap) the orphans
    try:
        gateway = start_gateway(workers=2)
        workers = gateway.worker_pids()
        calls, running = start_calls(gateway.address, 6, playback_ms=1000)
        os.kill(gateway.pid, signal.SIGKILL)
        gateway.wait_exit(5)
        assert [g.get(timeout=15).outcome for g in running] == ["completed"] * 6
        for pid in workers:
            _, status = os.waitpid(pid, 0)
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        gateway.wait_for_log(r"lost its master; draining", count=2)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(gateway.address, timeout=2)
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
