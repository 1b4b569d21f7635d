"""FreeSWITCH's `socket host1|host2` failover rule (gateway.failover), as the simulator, `probe`
and `loadtest` apply it: the next host on a refused or unreachable connect, none on a stall."""

import errno
import json
import random
import socket

import pytest

from gateway import drain, failover, listeners
from gateway.simulator import CallOptions, SimulatedCall, run_load
from tests.gateway_process import gateway_command, run_command


def closed_port() -> tuple[str, int]:
    """A loopback address nothing listens on: connects to it are refused (RST)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()


def test_parse_targets_takes_the_socket_apps_list():
    assert failover.parse_targets("10.0.0.1:9090|10.0.0.2:9090") == [("10.0.0.1", 9090),
                                                                      ("10.0.0.2", 9090)]
    assert failover.parse_targets("[::1]:9090") == [("::1", 9090)]
    with pytest.raises(ValueError):
        failover.parse_targets("|")


@pytest.mark.parametrize("code, fails_over", [(errno.ECONNREFUSED, True),
                                              (errno.EHOSTUNREACH, True),
                                              (errno.ENETUNREACH, True),
                                              (errno.ETIMEDOUT, False),
                                              (errno.ECONNRESET, False)])
def test_the_rule(code, fails_over):
    assert failover.fails_over(OSError(code, "x")) is fails_over
    assert failover.fails_over(socket.timeout("timed out")) is False


def test_refused_goes_to_the_next_host(start_gateway):
    """A refused host, then a working one: the call completes on the second, the first is
    counted as having refused it."""
    gateway = start_gateway(workers=1)
    refusing = closed_port()
    targets = [refusing, gateway.address]
    result = run_load(targets, calls=20, rate=100, seed=1)
    assert result.counts()["completed"] == 20, result.failures()[:3]
    hosts = failover.tally(targets, result.results)
    assert vars(hosts[failover.describe(refusing)]) == {"calls": 0, "refused": 20, "stalled": 0}
    assert vars(hosts[failover.describe(gateway.address)]) == {"calls": 20, "refused": 0,
                                                               "stalled": 0}


def test_a_stalled_connect_does_not_fail_over(start_gateway):
    """A host that drops SYNs (here: a listener with the drain's SYN filter, as a firewall or a
    dead host would): the call waits there and times out; the next host is never tried."""
    gateway = start_gateway(workers=1)
    silent = listeners.bind("127.0.0.1:0", 16)
    drain.hold_syns(silent)
    try:
        targets = [silent.getsockname(), gateway.address]
        call = SimulatedCall(targets, CallOptions(connect_timeout=0.5), random.Random(1))
        result = call.run()
    finally:
        silent.close()
    assert result.outcome == "timeout", result
    assert result.host == failover.describe(targets[0]) and result.refused_by == []
    assert vars(failover.tally(targets, [result])[result.host]) == {
        "calls": 0, "refused": 0, "stalled": 1}


def test_every_host_refusing_is_a_refused_call():
    first, second = closed_port(), closed_port()
    result = SimulatedCall([first, second], CallOptions(), random.Random(1)).run()
    assert result.outcome == "refused"
    assert result.refused_by == [failover.describe(first), failover.describe(second)]


def test_loadtest_and_probe_take_a_target_list(start_gateway):
    gateway = start_gateway(workers=1)
    targets = f"{failover.describe(closed_port())}|{failover.describe(gateway.address)}"
    done = run_command([*gateway_command(), "loadtest", targets, "--calls", "10", "--json"],
                       capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    view = json.loads(done.stdout)
    assert list(view["hosts"].values()) == [{"calls": 0, "refused": 10, "stalled": 0},
                                            {"calls": 10, "refused": 0, "stalled": 0}]
    done = run_command([*gateway_command(), "probe", targets, "--wait", "2"],
                       capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout
    first, second = targets.split("|")
    assert f"{first}: refused (FreeSWITCH tries the next host at once)" in done.stdout
    assert f"{second}: took the call" in done.stdout
