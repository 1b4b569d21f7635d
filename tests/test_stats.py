"""The stats endpoint and operator tools, against a real master under real load."""

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import gevent
from gevent import socket as gsocket
from prometheus_client.parser import text_string_to_metric_families

from gateway.simulator import CallOptions, run_load
from tests.gateway_process import gateway_command, wait_until

TOTALS = {"calls": "calls", "failed": "calls_failed", "handler_exceptions": "handler_exceptions",
          "protocol_errors": "protocol_errors", "events": "events", "commands": "commands"}


def metrics(gateway) -> dict[tuple, float]:
    status, body = gateway.http_get("/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(body.decode()):   # Prometheus' own parser
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_stats_track_exits_generations_and_totals_under_load(start_gateway):
    """Kill a worker and reload under a steady stream: /stats shows the exit and its cause,
    generations come and go, totals never decrease, and /metrics agrees with /stats."""
    gateway = start_gateway(app="versioned:handle", workers=2)
    load = gevent.spawn(run_load, gateway.address, 400, 50, None, CallOptions(playback_ms=300),
                        41)
    views = []

    def sample():
        views.append(gateway.stats())
        return views[-1]

    gevent.sleep(1.5)
    victim = sample()["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: any(e["pid"] == victim for e in sample()["exits"]), what="exit listed")
    exit = next(e for e in views[-1]["exits"] if e["pid"] == victim)
    assert (exit["classification"], exit["signal"]) == ("killed", signal.SIGKILL)
    gateway.signal(signal.SIGHUP)
    wait_until(lambda: {w["generation"] for w in sample()["workers"]} >= {1, 2},
               what="generation 2 appears beside 1")
    wait_until(lambda: {w["generation"] for w in sample()["workers"]} == {2},
               what="generation 1 drained away")
    result = load.get(timeout=60)
    # Only the calls in flight on the killed worker may fail.
    assert {r.served_by for r in result.failures()} <= {victim, None}
    assert result.counts()["refused"] == result.counts()["timeout"] == 0
    for before, after in zip(views, views[1:]):
        for key in TOTALS:
            assert after["totals"][key] >= before["totals"][key], key
    assert views[-1]["master"]["reloads"] == 1 and views[-1]["master"]["generation"] == 2
    # Generation 1's two workers and its spare drained away.
    assert views[-1]["worker_exits"]["killed"] == 1 and views[-1]["worker_exits"]["drained"] == 3
    # Counters only grow, so each /metrics value lies between the /stats taken around it.
    before, samples, after = gateway.stats(), metrics(gateway), gateway.stats()
    for key, name in TOTALS.items():
        value = samples[(f"esl_gateway_{name}_total", ())]
        assert before["totals"][key] <= value <= after["totals"][key], key
    assert samples[("esl_gateway_worker_exits_total", (("classification", "killed"),))] == 1
    assert samples[("esl_gateway_generation", ())] == 2
    assert samples[("esl_gateway_reloads_total", ())] == 1
    for worker in after["workers"]:
        labels = (("generation", str(worker["generation"])), ("pid", str(worker["pid"])),
                  ("slot", str(worker["slot"])), ("state", worker["state"]))
        assert ("esl_gateway_worker_rss_bytes", labels) in samples


def test_accept_queue_rises_while_workers_are_stopped(start_gateway):
    """SIGSTOP every worker: the accept-queue figure counts the waiting calls, /healthz turns 503
    at the limit; SIGCONT: the queue drains and health comes back."""
    gateway = start_gateway(workers=2, args=["--health-queue-limit", "5"])
    workers = gateway.worker_pids()
    queue = lambda: gateway.stats()["listeners"][0]["queue"]   # noqa: E731
    assert queue() == 0 and gateway.http_get("/healthz")[0] == 200
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    waiting = []
    try:
        for _ in range(8):
            waiting.append(socket.create_connection(gateway.address, timeout=2))
        assert wait_until(lambda: queue() == 8, what="queue of 8")
        status, body = gateway.http_get("/healthz")
        assert status == 503 and b"accept queue" in body
        assert metrics(gateway)[("esl_gateway_listen_queue",
                                 (("listener", f"127.0.0.1:{gateway.address[1]}"),))] == 8
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    wait_until(lambda: queue() == 0, what="queue drained")
    assert gateway.http_get("/healthz")[0] == 200
    for sock in waiting:
        assert sock.recv(64) == b"connect\n\n"   # every queued call was served
        sock.close()


def test_slow_and_hostile_http_clients_do_not_hurt_calls_or_heartbeats(start_gateway):
    """100 slowloris clients plus garbage requests on the stats port: calls are served as fast as
    without them, heartbeats stay fresh, and a normal /stats still answers at once."""
    gateway = start_gateway(workers=2)
    calm = run_load(gateway.address, 200, 100, None, CallOptions(), 42)
    slow = [gsocket.create_connection(gateway.stats_address) for _ in range(100)]

    def dribble(sock):
        for byte in b"GET /stats HTTP/1.0\r\n":   # never finishes the request
            try:
                sock.send(bytes([byte]))
            except OSError:
                return   # the server closed it at its deadline: good
            gevent.sleep(0.2)

    dribblers = [gevent.spawn(dribble, sock) for sock in slow]
    for garbage, status in ((b"\x00\xff" * 5000, b"431"),
                            (b"POST /stats HTTP/1.0\r\n\r\n", b"405"), (b"GET\r\n\r\n", b"400")):
        with gsocket.create_connection(gateway.stats_address) as sock:
            sock.sendall(garbage)
            assert sock.recv(100).split()[1] == status
    attacked = run_load(gateway.address, 200, 100, None, CallOptions(), 43)
    started = time.monotonic()
    view = gateway.stats()
    answer_time = time.monotonic() - started
    gevent.killall(dribblers)
    for sock in slow:
        sock.close()
    print(f"\nslow clients: first byte p99 {calm.percentile('first_byte_ms', 0.99):.1f} ms calm, "
          f"{attacked.percentile('first_byte_ms', 0.99):.1f} ms under attack; /stats answered "
          f"in {answer_time * 1000:.0f} ms")
    assert attacked.counts()["completed"] == 200
    assert answer_time < 0.5
    assert max(w["heartbeat_age_s"] for w in view["workers"]) < 1.5
    assert "aborting" not in gateway.log()
    assert attacked.percentile("first_byte_ms", 0.99) < max(
        3 * calm.percentile("first_byte_ms", 0.99), 50)


def test_stats_and_top_commands(start_gateway):
    """`esl-gateway stats` prints the table; `top -n 2` refreshes with a call rate."""
    gateway = start_gateway(workers=2)
    run_load(gateway.address, 50, 100)
    address = "%s:%d" % gateway.stats_address
    shown = subprocess.run([*gateway_command(), "stats", "--stats", address],
                           capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0, shown.stderr
    assert f"master {gateway.pid}" in shown.stdout and re.search(r"SLOT +PID", shown.stdout)
    assert all(str(pid) in shown.stdout for pid in gateway.worker_pids())
    live = subprocess.run([*gateway_command(), "top", "--stats", address, "-n", "2", "-i", "0.3"],
                          capture_output=True, text=True, timeout=30)
    assert live.returncode == 0 and live.stdout.count("health: ok") == 2
    assert "calls/s" in live.stdout


def test_endpoint_disabled_with_none(start_gateway):
    """--stats none: no stats port at all, and the gateway serves as usual."""
    gateway = start_gateway(workers=1, args=["--stats", "none"])
    assert "Stats at" not in gateway.log()
    assert run_load(gateway.address, 5, 50).counts()["completed"] == 5


def test_every_metric_is_documented_in_the_readme(start_gateway):
    """Each metric family /metrics serves has a row in the README's metrics table."""
    gateway = start_gateway(workers=1)
    run_load(gateway.address, 5, 50)
    status, body = gateway.http_get("/metrics")
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    names = {family.name for family in text_string_to_metric_families(body.decode())}
    undocumented = [name for name in sorted(names)
                    if f"`{name}" not in readme and f"`{name}_total" not in readme]
    assert not undocumented
