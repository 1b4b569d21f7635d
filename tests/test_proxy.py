"""Proxy mode: esl-gateway in front of an outbound listener it does not run (tests/backend_listener
stands in for a team's Go service), relaying every call, surviving the backend's restarts."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import gevent
import pytest

from gateway.simulator import CallOptions, SimulatedCall, run_load
from tests.gateway_process import ROOT, gateway_command, wait_until


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class BackendProcess:
    """tests/backend_listener as a process of its own, to kill and restart."""

    def __init__(self, address: str, name: str, log_path: Path):
        self.address, self.name, self.log_path = address, name, log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> "BackendProcess":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.backend_listener", self.address, "--name",
                 self.name], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                env=dict(os.environ, PYTHONPATH=str(ROOT)), start_new_session=True)
        deadline = time.monotonic() + 10
        while f"{self.proc.pid} listening" not in self.log():
            assert time.monotonic() < deadline, self.log()
            gevent.sleep(0.01)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


@pytest.fixture
def start_backend(tmp_path):
    started = []

    def start(name="b1", address=None):
        address = address or f"127.0.0.1:{free_port()}"
        backend = BackendProcess(address, name, tmp_path / f"{name}.log").start()
        started.append(backend)
        return backend

    yield start
    for backend in started:
        backend.kill()


def test_calls_are_relayed_to_the_backend(start_gateway, start_backend):
    """Every call reaches the backend, which runs it as it would from FreeSWITCH; /stats shows
    the relays and their bytes."""
    backend = start_backend()
    gateway = start_gateway(app="", args=["--proxy", backend.address])
    result = run_load(gateway.address, calls=100, rate=100, seed=1)
    assert result.counts()["completed"] == 100, result.failures()[:3]
    assert {r.variables.get("backend_name") for r in result.results} == {"b1"}
    assert all(r.hangup_cause == "NORMAL_CLEARING" for r in result.results)
    figures = wait_until(lambda: (f := gateway.stats()["proxy"]["backends"][backend.address])[
        "relayed"] == 100 and f, 5, "the relays in /stats")
    print("\nproxy:", figures)
    assert figures["connects"] == figures["relayed"] == 100 and figures["refused"] == 0
    assert figures["bytes_to_backend"] > 100 * 3000 and figures["bytes_to_freeswitch"] > 0


@pytest.mark.parametrize("reconnect", ["off", "on"])
def test_a_backend_killed_and_restarted_every_second(start_gateway, start_backend, reconnect):
    """The backend dies (SIGKILL) and comes back every second while calls arrive at 100/s:
    FreeSWITCH never sees a refusal or a timeout; calls that arrive meanwhile wait for it.
    Without --backend-reconnect only the calls in flight on the dying backend are lost (their
    FreeSWITCH side is closed at once, the dialplan goes on); with it, every call completes."""
    backend = start_backend()
    gateway = start_gateway(app="", args=["--proxy", backend.address, "--backend-reconnect",
                                          reconnect])
    kills = []

    def chaos():
        for _ in range(5):
            gevent.sleep(1.0)
            kills.append(time.monotonic())
            backend.kill()
            backend.start()

    chaos_greenlet = gevent.spawn(chaos)
    result = run_load(gateway.address, calls=700, rate=100, seed=7,
                      options=CallOptions(playback_ms=50))
    chaos_greenlet.get()
    counts = result.counts()
    figures = wait_until(lambda: (f := gateway.stats()["proxy"]["backends"][backend.address])[
        "relayed"] >= counts["completed"] and f, 5, "the relays in /stats")
    print(f"\nbackend chaos, reconnect {reconnect}:", counts, figures)
    assert counts["refused"] == counts["timeout"] == counts["protocol_error"] == 0
    assert len(kills) == 5 and figures["refused"] > 0
    if reconnect == "on":
        assert counts["completed"] == 700, result.failures()[:3]
        assert figures["reconnected"] == figures["died_mid_call"] > 0
    else:
        assert counts["completed"] >= 0.9 * 700
        assert all(any(0 <= call.ended_at - at < 1.0 for at in kills)
                   for call in result.failures()), result.failures()[:3]
        assert figures["died_mid_call"] >= len(result.failures())


FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("capture", ["async_full", "static_full", "json_xml_bgapi",
                                     "exit_midcall"])
def test_a_recorded_real_call_is_relayed_byte_for_byte(start_gateway, capture):
    """A conversation captured from a real FreeSWITCH 1.11.2, replayed frame by frame through
    the proxy, FreeSWITCH's bytes from a fake FreeSWITCH and the server's from a fake backend:
    each end receives exactly what the other sent, and FreeSWITCH's half-close reaches the
    backend, whose close reaches FreeSWITCH."""
    import json
    from gevent import socket as gsocket
    frames = json.loads((FIXTURES / f"{capture}.frames.json").read_text())
    streams = {"fs": (FIXTURES / f"{capture}.fs.bin").read_bytes(),
               "us": (FIXTURES / f"{capture}.sent.bin").read_bytes()}
    ends = {}   # frame index -> end offset in its stream
    for side in streams:
        offsets = [(i, f["offset"]) for i, f in enumerate(frames) if f["dir"] == side]
        for (index, _), (_, next_offset) in zip(offsets, offsets[1:] + [(None,
                                                                          len(streams[side]))]):
            ends[index] = next_offset
    listener = gsocket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    gateway = start_gateway(app="", workers=1,
                            args=["--proxy", "127.0.0.1:%d" % listener.getsockname()[1]])
    freeswitch = gsocket.create_connection(gateway.address)
    backend, _ = listener.accept()
    received = {"fs": bytearray(), "us": bytearray()}   # what reached the backend, FreeSWITCH
    sockets = {"fs": freeswitch, "us": backend}
    for index, frame in enumerate(frames):
        side, other = frame["dir"], "us" if frame["dir"] == "fs" else "fs"
        sockets[side].sendall(streams[side][frame["offset"]:ends[index]])
        with gevent.Timeout(5):
            while len(received[side]) < ends[index]:   # it has reached the other end
                received[side] += sockets[other].recv(65536)
    freeswitch.shutdown(socket.SHUT_WR)
    with gevent.Timeout(5):
        assert backend.recv(65536) == b""   # FreeSWITCH's half-close, passed on
        backend.close()
        assert freeswitch.recv(65536) == b""   # and the backend's close
    freeswitch.close()
    listener.close()
    assert bytes(received["fs"]) == streams["fs"] and bytes(received["us"]) == streams["us"]


def test_with_one_of_two_backends_down_every_call_goes_to_the_live_one(start_gateway,
                                                                       start_backend):
    """A backend that refuses is skipped (tried again only now and then): every call goes to
    the live one, and the refusals cost the calls no noticeable delay."""
    live = start_backend("live")
    down = f"127.0.0.1:{free_port()}"   # nothing listens there
    gateway = start_gateway(app="", args=["--proxy", f"{down},{live.address}"])
    result = run_load(gateway.address, calls=200, rate=100, seed=3)
    assert result.counts()["completed"] == 200, result.failures()[:3]
    assert {r.variables.get("backend_name") for r in result.results} == {"live"}
    figures = wait_until(lambda: (v := gateway.stats()["proxy"]["backends"])[live.address][
        "relayed"] == 200 and v, 5, "the relays in /stats")
    print("\none backend down:", figures[down], "first byte p99",
          result.percentile("first_byte_ms", 0.99))
    assert figures[down]["connects"] == 0 and 1 <= figures[down]["refused"] <= 10
    assert result.percentile("first_byte_ms", 0.99) < 20


def test_healthz_says_when_no_backend_answers(start_gateway, start_backend):
    """/healthz turns 503 once calls found no backend for --backend-wait, and back to 200 when
    one answers again; a call that found none was handed back to the dialplan."""
    backend = start_backend()
    gateway = start_gateway(app="", args=["--proxy", backend.address, "--backend-wait", "1"])
    assert run_load(gateway.address, calls=5, rate=50).counts()["completed"] == 5
    backend.kill()
    lonely = SimulatedCall(gateway.address, CallOptions(), random.Random(1)).run()
    assert lonely.outcome == "timeout" or lonely.outcome == "early_close", lonely
    wait_until(lambda: gateway.http_get("/healthz") == (503, b"no backend has answered for 1s\n"),
               5, "/healthz 503")
    backend.start()
    wait_until(lambda: run_load(gateway.address, calls=1).counts()["completed"] == 1 and
               gateway.http_get("/healthz")[0] == 200, 10, "/healthz 200 again")


def test_reload_and_upgrade_cut_no_proxied_call(start_gateway, start_backend):
    """HUP and USR2 while 3-s calls are relayed: each generation's workers keep their relays
    until the calls end; nothing is refused, reset or cut."""
    backend = start_backend()
    gateway = start_gateway(app="", args=["--proxy", backend.address])
    load = gevent.spawn(run_load, gateway.address, 150, 20, None,
                        CallOptions(playback_ms=3000), 11)
    gevent.sleep(2)
    gateway.signal(signal.SIGHUP)
    gateway.wait_for_log(r"reload complete")
    gevent.sleep(1)
    gateway.signal(signal.SIGUSR2)
    gateway.wait_for_log(r"upgrade complete", timeout=30)
    result = load.get(timeout=60)
    assert result.counts()["completed"] == 150, result.failures()[:3]
    assert gateway.stats()["master"]["generation"] == 3


def test_the_probe_says_which_backend_served_it(start_gateway, start_backend):
    """`esl-gateway probe --stats` against a gateway in proxy mode: OK, and the backend."""
    backend = start_backend()
    gateway = start_gateway(app="", args=["--proxy", backend.address])
    shown = subprocess.run([*gateway_command(), "probe", "%s:%d" % gateway.address, "--stats",
                            "%s:%d" % gateway.stats_address], capture_output=True, text=True,
                           timeout=30)
    print("\n" + shown.stdout)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert f"proxy: the gateway relayed this call to backend {backend.address}" in shown.stdout


def test_a_unix_socket_backend_and_the_metrics(start_gateway, start_backend, tmp_path):
    """A backend on a unix socket; its figures in /metrics."""
    backend = start_backend("local", address=f"unix:{tmp_path / 'ivr.sock'}")
    gateway = start_gateway(app="", args=["--proxy", backend.address])
    assert run_load(gateway.address, calls=20, rate=50).counts()["completed"] == 20
    wait_until(lambda: gateway.stats()["proxy"]["backends"][backend.address]["relayed"] == 20,
               5, "the relays in /stats")
    status, body = gateway.http_get("/metrics")
    assert status == 200
    assert f'esl_gateway_backend_relayed_total{{backend="{backend.address}"}} 20.0'.encode() \
        in body
