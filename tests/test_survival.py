"""Calls survive the death of their worker: the master holds a copy of each call's socket and a
live worker takes the call over (gateway.session.Session.reattach).

Real master, real workers, real SIGKILLs; every call counted by the FreeSWITCH simulator.
"""

import os
import random
import re
import signal
from pathlib import Path

import gevent
import pytest

from gateway.simulator import CallOptions, SimulatedCall, run_load
from tests.gateway_process import wait_until


def kill_workers_under_load(gateway, kills, every, calls, rate, playback_ms, seed):
    """SIGKILL a random serving worker ``kills`` times, ``every`` seconds, while calls of
    ``playback_ms`` arrive at ``rate``; return (load result, killed pids)."""
    killed = []

    def killer():
        rng = random.Random(seed)
        for _ in range(kills):
            gevent.sleep(every)
            pid = rng.choice(gateway.worker_pids())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    killing = gevent.spawn(killer)
    result = run_load(gateway.address, calls=calls, rate=rate, seed=seed,
                      options=CallOptions(playback_ms=playback_ms))
    killing.get()
    return result, killed


def test_calls_survive_workers_killed_mid_call(start_gateway):
    """3-s calls arriving steadily; a worker is SIGKILLed every 2 s, five times: every call
    completes, hung up cleanly by its handler or by the resume hook; nothing is reset or cut;
    /stats counts the resumed calls and one log line names each by its uuid."""
    gateway = start_gateway(app="surviving:handle", workers=2,
                            args=["--resume", "surviving:resume"])
    result, killed = kill_workers_under_load(gateway, kills=5, every=2.0, calls=240, rate=20,
                                             playback_ms=3000, seed=5)
    counts = result.counts()
    totals = wait_until(lambda: (t := gateway.stats()["totals"])["calls_held"] == 0 and t,
                        10, "every copy released")
    resumed = set(re.findall(r"\[(\S+)\] resumed call \(worker \d", gateway.log()))
    print("\nsurvival:", counts, f"kills={len(killed)}", {k: v for k, v in totals.items()
                                                          if "resumed" in k or "orphan" in k
                                                          or k == "calls_lost"})
    assert counts["completed"] == 240, result.failures()[:3]
    assert all(r.hangup_cause == "NORMAL_CLEARING" for r in result.results)
    assert len(killed) == 5 and totals["resumed"] == len(resumed) > 0
    assert totals["calls_orphaned"] == totals["resumed"] + totals["resumed_gone"]
    assert totals["calls_lost"] == 0 and totals["calls_orphaned_now"] == 0
    assert resumed <= {r.uuid for r in result.results}


@pytest.mark.parametrize("action, outcome, cause", [
    ("hangup:USER_BUSY", "completed", "USER_BUSY"),
    ("dialplan", "early_close", None),
    ("transfer:1000:XML:operators", "completed", None),
])
def test_without_a_resume_hook_orphans_get_the_orphan_action(start_gateway, action, outcome,
                                                             cause):
    """No --resume hook: each orphaned call gets exactly --orphan-action from the live worker
    that took it over; calls on the surviving worker complete as usual."""
    gateway = start_gateway(app="surviving:handle", workers=2,
                            args=["--orphan-action", action, "--spare-workers", "0"])
    calls = [SimulatedCall(gateway.address, CallOptions(playback_ms=3000), random.Random(i))
             for i in range(12)]
    running = [gevent.spawn(call.run) for call in calls]
    wait_until(lambda: all(c.running_app and c.running_app[0] == "playback" for c in calls), 10,
               "every call in its playback")
    # The busier worker: the kernel may well have given the other one no call at all.
    victim = max(gateway.worker_pids(), key=[c.result.served_by for c in calls].count)
    on_victim = {c.uuid for c in calls if c.result.served_by == victim}
    os.kill(victim, signal.SIGKILL)
    results = [g.get(timeout=30) for g in running]
    fates = {(r.outcome, r.hangup_cause) for r in results if r.uuid in on_victim}
    transfers = {r.transferred_to for r in results if r.uuid in on_victim}
    assert transfers == ({"1000 XML operators"} if action.startswith("transfer") else {None})
    totals = gateway.stats()["totals"]
    print(f"\norphan action {action}:", fates, totals["resumed_fallback"])
    assert on_victim and fates == {(outcome, cause)}
    assert all((r.outcome, r.hangup_cause) == ("completed", "NORMAL_CLEARING")
               for r in results if r.uuid not in on_victim)
    assert totals["resumed_fallback"] == len(on_victim) and totals["resumed"] == 0
    assert gateway.log().count("no --resume hook") == len(on_victim)


@pytest.mark.parametrize("app", ["surviving:handle_dies_mid_command",
                                 "surviving:handle_dies_mid_frame"])
def test_a_worker_killed_mid_command_or_mid_frame_leaves_a_call_that_resumes(start_gateway,
                                                                             app):
    """The dead worker left half a command in FreeSWITCH's buffer, or half a frame unread in
    the socket: the worker that takes the call over realigns the stream and the resume hook
    hangs the call up cleanly."""
    gateway = start_gateway(app=app, workers=1, args=["--resume", "surviving:resume"])
    result = SimulatedCall(gateway.address, CallOptions(), random.Random(1)).run()
    assert (result.outcome, result.hangup_cause) == ("completed", "NORMAL_CLEARING"), result
    gateway.wait_for_log(rf"\[{result.uuid}\] resumed call \(worker 1 \(pid \d+, gen 1\) "
                         r"exited with code 1 without a word")
    assert gateway.stats()["totals"]["resumed"] == 1


def test_a_generation_that_must_close_hands_its_calls_to_the_next(start_gateway):
    """A reload whose old workers still hold calls at --graceful-timeout: with a resume hook,
    the calls are handed over to the new generation (resumed there), not cut."""
    gateway = start_gateway(app="surviving:handle", workers=2,
                            args=["--resume", "surviving:resume", "--graceful-timeout", "1"])
    calls = [SimulatedCall(gateway.address, CallOptions(playback_ms=4000), random.Random(i))
             for i in range(10)]
    running = [gevent.spawn(call.run) for call in calls]
    wait_until(lambda: all(c.running_app and c.running_app[0] == "playback" for c in calls), 10,
               "every call in its playback")
    gateway.signal(signal.SIGHUP)
    results = [g.get(timeout=30) for g in running]
    assert [(r.outcome, r.hangup_cause) for r in results] == [("completed",
                                                                "NORMAL_CLEARING")] * 10
    gateway.wait_for_log(r"handing the call over to another worker: the graceful timeout",
                         count=10)
    assert len(re.findall(r"resumed call \(worker \d \(pid \d+, gen 1\) exited cleanly",
                          gateway.log())) == 10
    assert gateway.stats()["totals"]["resumed"] == 10


def test_a_call_that_hung_up_while_orphaned_is_closed_not_resumed(start_gateway):
    """The caller hung up while the call's worker was dying: the worker that takes the call
    over finds the channel down in the fresh CHANNEL_DATA, closes it and counts it."""
    gateway = start_gateway(app="surviving:handle_hangs_up_and_dies", workers=1,
                            args=["--resume", "surviving:resume"])
    result = SimulatedCall(gateway.address, CallOptions(), random.Random(2)).run()
    assert (result.outcome, result.hangup_cause) == ("completed", "NORMAL_CLEARING"), result
    gateway.wait_for_log(rf"\[{result.uuid}\] call -1 \(worker 1 .*\) had hung up before it "
                         r"could be resumed|call -1 \(worker 1 .*\) had ended before it could "
                         r"be resumed")
    totals = gateway.stats()["totals"]
    assert (totals["resumed_gone"], totals["resumed"]) == (1, 0)


def test_an_idle_master_sleeps_yet_holds_each_calls_socket_at_once(start_gateway):
    """An idle master watches the call ledgers instead of reading them ten times a second (it
    wakes for heartbeats and its tick), yet the first call's socket reaches it at once and is let
    go once the call ends; so too from a worker started while the master slept."""
    gateway = start_gateway(app="surviving:handle", workers=1, args=["--spare-workers", "0"])

    def wakeups() -> int:
        return sum(int(line.split()[1]) for task in Path(f"/proc/{gateway.pid}/task").iterdir()
                   for line in (task / "status").read_text().splitlines()
                   if line.startswith("voluntary_ctxt_switches"))

    def quiet_for_a_second() -> bool:
        before = wakeups()
        gevent.sleep(1)
        return wakeups() - before < 5

    def held() -> int:
        return gateway.stats()["totals"]["calls_held"]

    for after_a_replacement in (False, True):
        wait_until(quiet_for_a_second, 15, "an idle master")
        if after_a_replacement:   # started while the master slept
            [worker] = gateway.worker_pids()
            os.kill(worker, signal.SIGKILL)
            gateway.wait_for_log(r"ready, generation", count=2)
            wait_until(quiet_for_a_second, 15, "an idle master")
        call = gevent.spawn(SimulatedCall(gateway.address, CallOptions(playback_ms=1000),
                                          random.Random(after_a_replacement)).run)
        wait_until(lambda: held() == 1, 0.5, "the call's socket held")
        assert call.get(timeout=10).outcome == "completed"
        wait_until(lambda: held() == 0, 2, "the call's socket let go")
