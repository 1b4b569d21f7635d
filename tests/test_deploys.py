"""Zero-downtime deploys, with real processes, real signals and every call counted.

Reload (HUP) starts a new generation with fresh app code and drains the old one only once the new
one is ready; upgrade (USR2) re-execs the master itself in place, same PID; under systemd the
listening socket outlives even a killed master.
"""

import ctypes
import os
import random
import re
import signal
import socket
import subprocess
import time
from datetime import datetime
from pathlib import Path

import gevent
import pytest

from gateway.simulator import CallOptions, SimulatedCall, run_load
from tests.fake_systemd import FakeSystemd
from tests.gateway_process import gateway_command, wait_until

PR_SET_CHILD_SUBREAPER = 36


@pytest.fixture
def subreaper():
    """Adopt (and let the test reap) workers orphaned by a killed master."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    yield
    libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
    reap_orphans()


def reap_orphans():
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                return
        except ChildProcessError:
            return


@pytest.fixture
def fake_systemd(tmp_path):
    systemd = FakeSystemd(tmp_path)
    yield systemd
    systemd.close()


def completed_at(gateway, kind, count):
    """Monotonic time of the ``count``-th "<kind> complete" line, and its reported latency."""
    lines = [line for line in gateway.log().splitlines() if f"{kind} complete" in line]
    line = lines[count - 1]
    wall = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    latency = float(re.search(r"([\d.]+)s after the signal", line).group(1))
    return wall - (time.time() - time.monotonic()), latency


def test_reloads_and_upgrades_under_load_cut_no_call(start_gateway):
    """3 s calls arrive steadily while 10 reloads and 3 upgrades deploy new code: 0 refused,
    0 reset, 0 calls cut, every call that started after a deploy completed ran the new code, and
    the master's PID never changed."""
    gateway = start_gateway(app="versioned:handle", workers=2, args=["--pidfile", "gw.pid"])
    master_pid = gateway.pid
    load = gevent.spawn(run_load, gateway.address, 700, 20, None,
                        CallOptions(playback_ms=3000, call_deadline=60), 31)
    deploys = []   # (version, monotonic completion time, latency reported by the master)
    done = {"reload": 0, "upgrade": 0}
    for version in range(2, 15):
        gevent.sleep(1.5)
        kind = "upgrade" if version in (5, 9, 13) else "reload"
        (gateway.workdir / "VERSION").write_text(str(version))
        gateway.signal(signal.SIGUSR2 if kind == "upgrade" else signal.SIGHUP)
        done[kind] += 1
        gateway.wait_for_log(f"{kind} complete", count=done[kind], timeout=30)
        deploys.append((version, *completed_at(gateway, kind, done[kind])))
        assert int((gateway.workdir / "gw.pid").read_text()) == master_pid
    result = load.get(timeout=120)
    counts = result.counts()
    latencies = [latency for *_, latency in deploys]
    print(f"\ndeploys: {done}, outcomes {counts}, signal -> new generation accepting: "
          f"min {min(latencies):.2f}s max {max(latencies):.2f}s")
    assert counts["completed"] == 700, (counts, result.failures()[:3])
    assert gateway.pid == master_pid and gateway.proc.poll() is None
    for call in result.results:
        started = call.ended_at - call.duration_ms / 1000
        deployed = [version for version, completed, _ in deploys if started > completed]
        if deployed:
            assert int(call.variables["app_version"]) >= max(deployed), (call, deployed)
    assert "Traceback" not in gateway.log()


@pytest.mark.parametrize("kind", ["reload", "upgrade"])
def test_failed_deploy_keeps_the_old_generation_serving(start_gateway, kind):
    """A deploy whose app cannot be imported is abandoned (reload) or rolled back (upgrade,
    caught by the new image's start-up check): the old workers keep serving, no call is lost,
    and the failure is logged with its traceback."""
    gateway = start_gateway(app="crashloop:handle", workers=2)
    workers = sorted(gateway.worker_pids())
    load = gevent.spawn(run_load, gateway.address, 150, 30, None, CallOptions(playback_ms=200),
                        32)
    gevent.sleep(1)
    (gateway.workdir / "crash-on-boot").touch()
    gateway.signal(signal.SIGHUP if kind == "reload" else signal.SIGUSR2)
    gateway.wait_for_log(f"{kind} abandoned", timeout=30)
    result = load.get(timeout=60)
    assert result.counts()["completed"] == 150, result.counts()
    assert sorted(gateway.worker_pids()) == workers
    assert "deliberate boot failure (crash-on-boot exists)" in gateway.log()
    assert gateway.proc.poll() is None


def test_socket_activation_survives_a_killed_master(start_gateway, fake_systemd, subreaper):
    """With the socket held by systemd, kill -9 of the master under load refuses nothing: calls
    queue until the next master takes the same socket. Notify messages come in order."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    address = listener.getsockname()
    first = start_gateway(workers=2, env=fake_systemd.env, listen_socks=[(listener, "esl")])
    assert first.address == address
    fake_systemd.wait_for("READY")
    load = gevent.spawn(run_load, address, 300, 50, None, CallOptions(playback_ms=300), 33)
    gevent.sleep(1.5)
    os.kill(first.pid, signal.SIGKILL)
    first.wait_exit(5)
    gevent.sleep(0.5)   # a gap with no master at all: calls wait in systemd's socket
    second = start_gateway(workers=2, env=fake_systemd.env, listen_socks=[(listener, "esl")])
    result = load.get(timeout=60)
    counts = result.counts()
    print("\nsocket activation, master killed:", counts)
    assert counts["completed"] == 300, (counts, result.failures()[:3])
    second.signal(signal.SIGHUP)
    second.wait_for_log("reload complete")
    fake_systemd.wait_for("READY", count=3)
    second.stop()
    fake_systemd.wait_for("STOPPING")
    assert fake_systemd.keys() == ["READY", "READY", "RELOADING", "READY", "STOPPING"]
    reloading = [m for m in fake_systemd.messages if m.get("RELOADING") == "1"][0]
    assert int(reloading["MONOTONIC_USEC"]) > 0
    assert any(m.get("STATUS", "").startswith("gen 2: 2/2 workers ready")
               for m in fake_systemd.messages)
    listener.close()


def test_fd_store_keeps_the_port_through_a_master_crash(start_gateway, fake_systemd, subreaper):
    """Not socket activated, the master pushes its socket into systemd's fd store; after kill -9
    systemd hands it to the next master (LISTEN_FDS), and no call in between is refused."""
    first = start_gateway(workers=2, env=fake_systemd.env)
    fake_systemd.wait_for("FDSTORE")
    [stored] = fake_systemd.stored["esl-gateway"]
    assert stored.getsockname()[1] == first.address[1]
    load = gevent.spawn(run_load, first.address, 200, 50, None, CallOptions(playback_ms=200), 34)
    gevent.sleep(1.5)
    os.kill(first.pid, signal.SIGKILL)
    first.wait_exit(5)
    second = start_gateway(workers=2, env=fake_systemd.env, listen_socks=[(stored, "esl-gateway")])
    result = load.get(timeout=60)
    print("\nfd store, master killed:", result.counts())
    assert result.counts()["completed"] == 200, result.counts()
    assert "passed by systemd (esl-gateway)" in second.log()


def test_max_generations_closes_the_oldest_with_a_log(start_gateway):
    """Back-to-back reloads while long calls pin old generations: beyond --max-generations the
    oldest generation is closed (its calls cut, logged); the newer ones keep their calls."""
    gateway = start_gateway(app="versioned:handle", workers=1, args=["--max-generations", "2"])
    calls = [SimulatedCall(gateway.address, CallOptions(playback_ms=5000), random.Random(i))
             for i in range(3)]
    running = []
    for reloads in range(1, 4):
        running.append(gevent.spawn(calls[reloads - 1].run))
        with gevent.Timeout(10):
            while not calls[reloads - 1].running_app:
                gevent.sleep(0.02)
        gateway.signal(signal.SIGHUP)
        gateway.wait_for_log("reload complete", count=reloads)
    # Three reloads: generation 4 serves, 3 drains; 1 and 2 are closed, oldest first.
    gateway.wait_for_log(r"more than 2 generations running: closing generation 1 now")
    gateway.wait_for_log(r"more than 2 generations running: closing generation 2 now")
    outcomes = [greenlet.get(timeout=20).outcome for greenlet in running]
    assert outcomes == ["early_close", "early_close", "completed"]
    assert len(re.findall(r"closing call still up: asked to quit \(SIGQUIT\)",
                          gateway.log())) == 2


def test_reload_never_ready_is_abandoned_after_ready_timeout(start_gateway):
    """New workers that hang while booting: after --ready-timeout the reload is abandoned, its
    workers go, and the old generation serves throughout."""
    gateway = start_gateway(app="slowboot:handle", workers=2, args=["--ready-timeout", "2"])
    workers = sorted(gateway.worker_pids())
    (gateway.workdir / "hang-on-boot").touch()
    gateway.signal(signal.SIGHUP)
    result = run_load(gateway.address, 100, 25, None, CallOptions(), 35)
    gateway.wait_for_log(r"reload abandoned: generation 2 was not ready within 2s", timeout=15)
    assert result.counts()["completed"] == 100
    assert {r.served_by for r in result.results} <= set(workers)
    wait = time.monotonic() + 15
    while sorted(gateway.worker_pids()) != workers:   # the hung generation is gone
        assert time.monotonic() < wait, gateway.worker_pids()
        gevent.sleep(0.1)
    assert gateway.stats()["master"]["reload_failures"] == 1


def test_graceful_timeout_closes_leftover_calls_with_a_log_line(start_gateway):
    """TERM with calls longer than --graceful-timeout: each is closed, logged, then the master
    exits; nothing hangs for ever."""
    gateway = start_gateway(workers=1, args=["--graceful-timeout", "1"])
    calls = [SimulatedCall(gateway.address, CallOptions(playback_ms=30000), random.Random(i))
             for i in range(3)]
    running = [gevent.spawn(call.run) for call in calls]
    with gevent.Timeout(10):
        while not all(c.running_app for c in calls):
            gevent.sleep(0.02)
    gateway.signal(signal.SIGTERM)
    outcomes = [greenlet.get(timeout=15).outcome for greenlet in running]
    assert outcomes == ["early_close"] * 3
    assert gateway.wait_exit(15) == 0
    assert len(re.findall(r"closing call still up: the graceful timeout", gateway.log())) == 3


def test_upgrade_hands_over_workers_counters_and_history(start_gateway):
    """Across the exec the new image keeps the old workers' table (their uptime runs on), the
    totals, the exit history and the deploy counters: nothing is forgotten."""
    gateway = start_gateway(workers=2)
    run_load(gateway.address, 50, 100)
    victim = gateway.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    gateway.wait_for_log(r"ready, generation", count=3)
    gevent.sleep(2.5)   # the old workers grow older than the upgrade itself takes
    before = gateway.stats()
    gateway.signal(signal.SIGUSR2)
    gateway.wait_for_log("upgrade complete")

    def drained_slots():   # the two old workers drained (the old spare may go first)
        view = gateway.stats()
        return len([e for e in view["exits"] if e["classification"] == "drained"
                    and e["slot"]]) == 2 and view
    after = wait_until(drained_slots, 15, "both old workers drained")
    assert after["master"]["pid"] == before["master"]["pid"]
    assert after["master"]["started"] == before["master"]["started"]
    assert after["master"]["upgrades"] == 1 and after["master"]["generation"] == 2
    # Counters live in shared memory: even the SIGKILLed worker's are all there.
    assert after["totals"]["calls"] >= before["totals"]["calls"] > 0
    assert any(e["pid"] == victim and e["classification"] == "killed" for e in after["exits"])
    drained = [e for e in after["exits"] if e["classification"] == "drained" and e["slot"]]
    assert len(drained) == 2 and all(e["uptime"] > 2.5 for e in drained), drained


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, theirs, ...) as /proc shows them now."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue   # it just exited
        found += map(int, children)
        queue += map(int, children)
    return found


@pytest.mark.parametrize("signum, kind", [(signal.SIGHUP, "reload"),
                                          (signal.SIGUSR2, "upgrade")])
def test_a_deploy_signal_sent_to_every_process_moves_only_the_master(start_gateway, signum,
                                                                      kind):
    """`systemctl kill -s USR2 esl-gateway` (the shipped unit's upgrade command) signals every
    process of the unit, and systemd repeats its pass until it finds no new pid, so processes
    the master forks in answer (the upgrade's check, a fork server, workers) get the signal
    too. They must ignore the master's signals: a check process killed by it failed the upgrade
    under real systemd. Here every process is signalled, and each new one as soon as it
    appears, until the deploy completes, with calls arriving: the deploy completes, no child
    dies of it, no call fails."""
    gateway = start_gateway(workers=2)
    load = gevent.spawn(run_load, gateway.address, 150, 50, None, CallOptions(playback_ms=200),
                        33)
    gevent.sleep(1)
    signalled = set()

    def signal_every_new_process():
        for pid in [gateway.pid, *descendants(gateway.pid)]:
            if pid not in signalled:
                signalled.add(pid)
                os.kill(pid, signum)
        return f"{kind} complete" in gateway.log() or f"{kind} abandoned" in gateway.log()
    wait_until(signal_every_new_process, 30, f"{kind} over", poll=0.002)
    result = load.get(timeout=60)
    assert f"{kind} complete" in gateway.log(), gateway.log()[-4000:]
    assert len(signalled) > 4   # master, fork server, workers, and new ones
    assert result.counts()["completed"] == 150, (result.counts(), result.failures()[:3])
    assert not re.search(r"ended \(|signal \d+ \(SIG(HUP|USR2)\)", gateway.log()), \
        gateway.log()[-4000:]


@pytest.mark.parametrize("kind", ["reload", "upgrade"])
def test_deploy_command_waits_for_the_outcome(start_gateway, tmp_path, kind):
    """`esl-gateway reload|upgrade --wait` (the shipped unit's ExecReload=) returns once the new
    generation accepts, with exit 0, or once the deploy is abandoned, with exit 1 and the
    reason; it finds the master's pidfile, stats address and token in the config file."""
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    pidfile = tmp_path / "gw.pid"
    gateway = start_gateway(app="crashloop:handle",
                            args=["--pidfile", str(pidfile), "--stats-token-file", str(token)])
    ini = tmp_path / "esl-gateway.ini"
    ini.write_text(f"[esl-gateway]\npidfile = {pidfile}\nstats_token_file = {token}\n"
                   "ready_timeout = 10\n")
    stats = ["--stats", "%s:%d" % gateway.stats_address]

    def command(*args):
        return subprocess.run([*gateway_command(), *args], capture_output=True, text=True,
                              timeout=60, cwd=gateway.workdir)
    done = command(kind, "-c", str(ini), *stats, "--wait")
    assert (done.returncode, done.stdout) == (
        0, f"master {gateway.pid}: {kind} complete: generation 2 accepting\n"), done.stderr
    assert f"{kind} complete" in gateway.log()   # it had happened when the command returned
    (gateway.workdir / "crash-on-boot").touch()
    failed = command(kind, "-c", str(ini), *stats, "--wait")
    assert failed.returncode == 1 and f"master {gateway.pid}: {kind} abandoned: " in failed.stderr
    assert f"{kind} abandoned" in gateway.log()
    refused = command("stats", *stats)   # without the token
    assert refused.returncode == 1 and "401" in refused.stderr
    shown = command("stats", "-c", str(ini), *stats)
    assert shown.returncode == 0 and "generation 2" in shown.stdout, shown.stderr


def test_an_upgrade_refused_during_a_reload_is_said_at_once(start_gateway):
    """USR2 while a reload's generation is still starting is refused, counted as a failed
    upgrade with its reason, so `upgrade --wait` says so at once instead of waiting out
    ready_timeout; the reload goes on."""
    gateway = start_gateway(app="slowboot:handle", args=["--ready-timeout", "60"])
    (gateway.workdir / "hang-on-boot").touch()
    gateway.signal(signal.SIGHUP)
    gateway.wait_for_log("reload: starting generation 2")
    refused = subprocess.run(
        [*gateway_command(), "upgrade", "--pid", str(gateway.pid),
         "--stats", "%s:%d" % gateway.stats_address, "--wait"],
        capture_output=True, text=True, timeout=20)   # --wait alone would give up after 90 s
    assert refused.returncode == 1
    assert ("upgrade abandoned: refused while generation 2 is starting; send USR2 again once it "
            "is ready") in refused.stderr
    master = gateway.stats()["master"]
    assert (master["upgrade_failures"], master["starting_generation"]) == (1, 2)
