"""Host drain (gateway.drain) with real masters, real signals and every call counted: a fleet of
two gateways behind FreeSWITCH's `host1|host2` failover, a drain with calls in the accept queue,
and a drained socket handed to a new master as systemd would."""

import errno
import os
import random
import signal
import socket
import time

import gevent
import pytest

from gateway import drain, failover, listeners, report
from gateway.simulator import CallOptions, SimulatedCall, run_load
from tests.gateway_process import gateway_command, run_command, wait_until

RATE = 200          # calls/s in all, half on each dialplan order
SECONDS = 12


def health(gateway) -> tuple[int, str]:
    status, body = gateway.http_get("/healthz")
    return status, body.decode()


def drain_and_wait(gateway, complete: int = 1) -> float:
    """Drain; /healthz says so at once; return when the port refuses connects."""
    gateway.signal(drain.DRAIN_SIGNAL)
    wait_until(lambda: health(gateway)[0] == 503, 2, "/healthz 503")
    assert "draining" in health(gateway)[1]
    gateway.wait_for_log("drain complete", count=complete)
    return time.monotonic()


def started(result) -> float:
    return result.ended_at - result.duration_ms / 1000


# For a client: drop SYN-ACKs (flags & (SYN|ACK) == SYN|ACK), so its handshake stays half done.
SYNACK_DROP = ((0x30, 0, 0, 13), (0x54, 0, 0, 0x12), (0x15, 0, 1, 0x12),
               (0x06, 0, 0, 0), (0x06, 0, 0, 0xFFFFFFFF))


def connect(address, timeout=1.0) -> socket.socket:
    return socket.create_connection(address, timeout=timeout)


def test_the_kernel_facts_a_drain_relies_on():
    """On this kernel: shutdown() of a listener resets the calls in its queue (why the queue is
    emptied first), then refuses connects, makes accept() fail with EINVAL, and listen() on the
    same descriptor listens again on the same port; the SYN filter makes a connect wait while
    queued connections are still accepted and carry data; a half-done handshake is counted."""
    sock = listeners.bind("127.0.0.1:0", 16)
    address = sock.getsockname()
    queued = connect(address)
    wait_until(lambda: listeners.accept_queue(sock)[0] == 1, 2, "one queued")
    sock.shutdown(socket.SHUT_RD)
    with pytest.raises(ConnectionResetError):
        queued.recv(1)
    with pytest.raises(ConnectionRefusedError):
        connect(address)
    with pytest.raises(OSError) as accepting:
        sock.accept()
    assert accepting.value.errno == errno.EINVAL and not listeners.is_listening(sock)
    sock.listen(16)
    assert sock.getsockname() == address and listeners.is_listening(sock)
    queued = connect(address)
    wait_until(lambda: listeners.accept_queue(sock)[0] == 1, 2, "one queued")
    drain.hold_syns(sock)
    with pytest.raises(socket.timeout):
        connect(address, timeout=0.3)
    assert not drain.settled(sock)
    accepted, _ = sock.accept()
    queued.sendall(b"call")
    assert accepted.recv(4) == b"call"
    half = socket.socket()
    drain.attach_filter(half, SYNACK_DROP)
    drain.release_syns(sock)
    half.setblocking(False)
    half.connect_ex(address)
    wait_until(lambda: drain.half_open(sock) == 1, 2, "a half-open handshake")
    assert listeners.accept_queue(sock)[0] == 0 and not drain.settled(sock)
    for each in (half, queued, accepted, sock):
        each.close()


def test_rolling_drain_of_a_two_host_fleet(start_gateway):
    """Two gateways on 127.0.0.2 and 127.0.0.3, same port; half the calls dial `h1|h2`, half
    `h2|h1` (200 calls/s in all, for 12 s). Host 1 is drained, stopped, started again and
    undrained; then host 2 is drained. Every call completes, none times out, and each host's
    share shows the hand-over: no call that started while a host refused was served there."""
    first = start_gateway(workers=2, args=["-b", "127.0.0.2:0"])
    port = first.address[1]
    second = start_gateway(workers=2, args=["-b", f"127.0.0.3:{port}"])
    h1, h2 = first.address, second.address
    calls = RATE // 2 * SECONDS
    loads = [gevent.spawn(run_load, order, calls, RATE / 2, None, CallOptions(), seed)
             for seed, order in enumerate(([h1, h2], [h2, h1]))]
    gevent.sleep(2)
    h1_refusing = drain_and_wait(first)
    gevent.sleep(1)   # calls in progress on host 1 (and FreeSWITCH fails over meanwhile)
    first.stop()
    gevent.sleep(1)   # host 1 is down: connects to it are refused
    h1_back = time.monotonic()   # it binds, and queues calls, at once
    restarted = start_gateway(workers=2, args=["-b", f"127.0.0.2:{port}"])
    restarted.signal(drain.UNDRAIN_SIGNAL)   # a fresh bind listens already: a no-op, logged
    restarted.wait_for_log("not drained; nothing to do")
    gevent.sleep(2)
    h2_refusing = drain_and_wait(second)
    results = [result for load in loads for result in load.get(timeout=60).results]
    counts = {outcome: sum(r.outcome == outcome for r in results) for outcome in
              ("completed", "timeout", "refused", "reset", "early_close", "protocol_error")}
    hosts = failover.tally([h1, h2], results)
    on_h1 = [r for r in results if r.host == failover.describe(h1)]
    on_h2 = [r for r in results if r.host == failover.describe(h2)]
    phases = {"before": (0, h1_refusing), "host 1 refusing": (h1_refusing, h1_back),
              "host 1 back": (h1_back, h2_refusing), "host 2 refusing": (h2_refusing, 1e12)}
    shares = {phase: (sum(low < started(r) <= high for r in on_h1),
                      sum(low < started(r) <= high for r in on_h2))
              for phase, (low, high) in phases.items()}
    print(f"\nfleet: offered {len(results)}, outcomes {counts}; host 1 "
          f"{vars(hosts[failover.describe(h1)])}, host 2 {vars(hosts[failover.describe(h2)])}; "
          f"calls started per phase (host 1, host 2): {shares}")
    assert len(results) == 2 * calls
    assert counts["completed"] == 2 * calls, [f"{r.outcome}: {r.detail}" for r in results
                                              if r.outcome != "completed"][:5]
    assert counts["timeout"] == 0
    assert hosts[failover.describe(h1)].calls + hosts[failover.describe(h2)].calls == 2 * calls
    # The hand-over: while host 1 refused (drained, stopped), every call went to host 2, and
    # after host 2's drain every call went to host 1.
    assert not [r for r in on_h1 if h1_refusing < started(r) < h1_back]
    assert not [r for r in on_h2 if started(r) > h2_refusing]
    assert [r for r in on_h2 if h1_refusing < started(r) < h1_back]   # host 2 took over
    assert [r for r in on_h1 if started(r) > h2_refusing]             # host 1 took over
    assert hosts[failover.describe(h1)].refused > 0 and hosts[failover.describe(h2)].refused > 0
    assert all(len(r.refused_by) <= 1 for r in results)


def test_drain_serves_every_call_already_queued(start_gateway):
    """50 calls wait in the accept queue (both workers SIGSTOPped); the drain starts then. Its
    /healthz says draining at once, the port stays listening while they wait; once the workers
    run again all 50 are served, none reset, and only then are connects refused. A call dialled
    meanwhile (its SYN dropped) is refused on its retransmission, about a second later. The
    undrain goes to the whole process group: the children ignore it."""
    gateway = start_gateway(workers=2, args=["--spare-workers", "0"])
    workers = gateway.worker_pids()
    assert len(workers) == 2
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    try:
        queued = [gevent.spawn(SimulatedCall(gateway.address, CallOptions(), random.Random(i)).run)
                  for i in range(50)]
        wait_until(lambda: gateway.stats()["listeners"][0]["queue"] == 50, 10, "50 queued")
        gateway.signal(drain.DRAIN_SIGNAL)
        wait_until(lambda: health(gateway)[0] == 503, 2, "/healthz 503")
        view = gateway.stats()
        assert view["master"]["drain"]["state"] == "emptying the queue"
        assert view["listeners"][0] == {"address": "%s:%d" % gateway.address, "queue": 50,
                                        "queue_limit": view["listeners"][0]["queue_limit"],
                                        "listening": True}
        late = gevent.spawn(SimulatedCall(gateway.address, CallOptions(), random.Random(99)).run)
        gevent.sleep(0.3)
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    results = [call.get(timeout=30) for call in queued]
    outcomes = {r.outcome for r in results}
    print(f"\nqueued at the drain: {len(results)}, outcomes {sorted(outcomes)}")
    assert [r.outcome for r in results] == ["completed"] * 50, [r.detail for r in results]
    gateway.wait_for_log("drain complete")
    late_result = late.get(timeout=10)
    assert late_result.outcome == "refused", late_result
    assert late_result.duration_ms > 500   # its first SYN was dropped, the retransmit refused
    assert SimulatedCall(gateway.address, CallOptions(), random.Random(7)).run().outcome == \
        "refused"
    view = gateway.stats()
    assert view["listeners"][0]["listening"] is False
    assert "NOT LISTENING (drained: refuses connects)" in report.render(view)
    forkers = gateway.worker_pids("fork server")
    os.killpg(gateway.pid, drain.UNDRAIN_SIGNAL)   # the whole unit, as `systemctl kill` would
    wait_until(lambda: health(gateway)[0] == 200, 5, "/healthz 200 after undrain")
    assert run_load(gateway.address, calls=20, rate=100).counts()["completed"] == 20
    # Only the master acts on the drain's signals; its children ignore them.
    assert gateway.worker_pids() == workers and gateway.worker_pids("fork server") == forkers


def test_a_drained_socket_handed_to_a_new_master_listens_again(start_gateway):
    """systemd keeps the socket (socket activation, the fd store) as a drained master left it:
    shut down, maybe still with the SYN filter. The next master takes the filter off and
    listens again on the same socket and port."""
    sock = listeners.bind("127.0.0.1:0", 128)
    address = sock.getsockname()
    drain.hold_syns(sock)
    sock.shutdown(socket.SHUT_RD)
    assert not listeners.is_listening(sock)
    gateway = start_gateway(workers=1, listen_socks=[(sock, "esl")])
    assert gateway.address == address
    assert "was handed over not listening" in gateway.log()
    assert run_load(address, calls=20, rate=100).counts()["completed"] == 20


def test_drain_and_undrain_commands_and_an_upgrade_while_drained(start_gateway, tmp_path):
    """`esl-gateway drain -p PIDFILE`, then an in-place upgrade (USR2): the new image keeps the
    drain (still refusing, /healthz 503); `esl-gateway undrain -p PIDFILE` and the upgraded
    generation's workers accept again."""
    pidfile = tmp_path / "gateway.pid"
    gateway = start_gateway(workers=1, args=["-p", str(pidfile)])
    done = run_command([*gateway_command(), "drain", "-p", str(pidfile)],
                       capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "sent SIGRTMIN+1" in done.stdout, done
    gateway.wait_for_log("drain complete")
    gateway.signal(signal.SIGUSR2)
    gateway.wait_for_log("upgrade complete")
    assert health(gateway)[0] == 503 and "draining: refusing" in health(gateway)[1]
    assert SimulatedCall(gateway.address, CallOptions(), random.Random(1)).run().outcome == \
        "refused"
    done = run_command([*gateway_command(), "undrain", "-p", str(pidfile)],
                       capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "sent SIGRTMIN+2" in done.stdout, done
    wait_until(lambda: health(gateway)[0] == 200, 5, "/healthz 200 after undrain")
    assert run_load(gateway.address, calls=20, rate=100).counts()["completed"] == 20
