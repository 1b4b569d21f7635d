"""`esl-gateway probe` and `esl-gateway loadtest` against our gateway and against listeners that
misbehave in each way FreeSWITCH can meet: silent, inbound ESL, resetting, garbage, closed."""

import argparse
import json
import re
import socket
import struct

import pytest
from gevent.server import StreamServer

from gateway import loadtest, probe
from tests.gateway_process import gateway_command, run_command


def serve(handler):
    """A listener on an ephemeral loopback port running ``handler(conn)`` per connection."""
    server = StreamServer(("127.0.0.1", 0), lambda conn, _: handler(conn))
    server.start()
    return server


def silent(conn):
    conn.recv(1)   # accepts, then never says anything (until the client leaves)


def inbound_esl(conn):
    conn.sendall(b"Content-Type: auth/request\n\n")
    conn.recv(100)


def resetting(conn):
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def garbage(conn):
    conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    conn.recv(100)


def connect_then_close(conn):
    conn.sendall(b"connect\n\n")
    conn.recv(65536)
    conn.close()


def probe_args(address, wait=1.0):
    parser = argparse.ArgumentParser()
    probe.add_arguments(parser)
    return parser.parse_args(["%s:%d" % address, "--wait", str(wait)])


def test_probe_says_ok_for_our_gateway(start_gateway):
    """Against esl-gateway: connect comes first, the call ends cleanly, exit status 0."""
    gateway = start_gateway(app="gateway.examples.ivr:handle", workers=1)
    done = run_command([*gateway_command(), "probe", "%s:%d" % gateway.address],
                       capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout
    assert "commands: connect, linger 10, myevents, sendmsg execute answer" in done.stdout
    assert "verdict: OK" in done.stdout


@pytest.mark.parametrize("handler, words", [
    (silent, "ACCEPTED BUT SILENT"),
    (inbound_esl, "WRONG MODE: this is an INBOUND event socket"),
    (garbage, "NOT AN OUTBOUND ESL SERVER"),
])
def test_probe_names_what_is_wrong(handler, words):
    """A silent listener, an inbound-ESL one and a stranger are each named, exit status 1."""
    server = serve(handler)
    try:
        behaves, lines = probe.probe(probe_args(server.address))
    finally:
        server.stop()
    assert not behaves
    assert any(words in line for line in lines), lines


def test_probe_of_a_closed_port_is_refused():
    """Nothing listening: refused, as FreeSWITCH's `Socket Error: Connection refused`."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    address = sock.getsockname()
    sock.close()
    behaves, lines = probe.probe(probe_args(address))
    assert not behaves and lines[-1].startswith("REFUSED")


def test_probe_warns_about_a_missing_linger():
    """An outbound server that never lingers gets the note that HANGUP_COMPLETE may be lost."""
    server = serve(connect_then_close)
    try:
        behaves, lines = probe.probe(probe_args(server.address))
    finally:
        server.stop()
    assert behaves   # it does hand the call back: legitimate, if unusual
    assert any("no `linger`" in line for line in lines)


@pytest.mark.parametrize("handler, outcome", [
    (resetting, "reset"), (silent, "timeout"), (garbage, "protocol_error"),
    (connect_then_close, "early_close"),
])
def test_loadtest_counts_each_failure_mode(handler, outcome):
    """Every call gets exactly one outcome, the right one, and any failure fails the run."""
    server = serve(handler)
    parser = argparse.ArgumentParser()
    loadtest.add_arguments(parser)
    args = parser.parse_args(["%s:%d" % server.address, "--calls", "20", "--concurrency", "10",
                              "--connect-wait", "0.5"])
    try:
        view = loadtest.summary(loadtest.run(args), args)
    finally:
        server.stop()
    assert view["calls"] == 20 and view["outcomes"][outcome] == 20, view


@pytest.mark.parametrize("scenario, extra", [("ivr", []), ("hangup-race", []),
                                             ("long", ["--hold", "2"])])
def test_loadtest_command_against_the_gateway(start_gateway, scenario, extra):
    """The CLI with several generator processes: JSON out, every call completed, exit 0."""
    gateway = start_gateway(app="gateway.examples.ivr:handle", workers=2)
    done = run_command([*gateway_command(), "loadtest", "%s:%d" % gateway.address,
                        "--scenario", scenario, "--calls", "200", "--rate", "200",
                        "--procs", "2", "--json", *extra],
                       capture_output=True, text=True, timeout=120)
    view = json.loads(done.stdout)
    assert done.returncode == 0, view
    assert view["calls"] == 200 and view["outcomes"]["completed"] == 200
    assert view["first_byte_ms"]["p50"] is not None
    if scenario == "long":
        assert view["call_ms"]["p50"] >= 2000


def test_loadtest_exit_status_reports_failures():
    """A run with any failed call exits non-zero (for scripts and CI)."""
    server = serve(resetting)
    try:
        done = run_command([*gateway_command(), "loadtest", "%s:%d" % server.address,
                            "--calls", "5", "--concurrency", "5"],
                           capture_output=True, text=True, timeout=60)
    finally:
        server.stop()
    assert done.returncode == 1
    assert re.search(r"^  reset\s+5$", done.stdout, re.MULTILINE), done.stdout
