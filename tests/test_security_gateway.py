"""Hardening against the real master and workers over real TCP: a hostile FreeSWITCH side, silent
peers, a peer outside --allow, the stats token, and the privilege drop with reload and upgrade."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gevent
import pytest
from gevent import socket as gsocket

from gateway import protocol
from gateway.simulator import run_load
from tests.gateway_process import APPS, ROOT, GatewayProcess, wait_until

GIB = 1 << 30


def assert_all_completed(result, calls: int) -> None:
    counts = result.counts()
    assert counts["completed"] == calls, (counts, result.failures()[:3])


def read_until_closed(sock, timeout: float) -> bytes:
    """Everything the gateway sends until it closes (or resets) the connection."""
    data = b""
    with gevent.Timeout(timeout, AssertionError(f"still open after {timeout}s: {data[:80]!r}")):
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk


def channel_data(uuid: str, *extra: tuple[str, str]) -> bytes:
    return protocol.connect_reply_frame([("Event-Name", "CHANNEL_DATA"), ("Unique-ID", uuid),
                                         ("Channel-State", "CS_EXECUTE"), *extra])


def replace_value(frame: bytes, name: bytes, raw: bytes) -> bytes:
    """``frame`` with header ``name``'s value replaced by ``raw`` bytes, as sent."""
    return re.sub(rb"(?m)^" + re.escape(name) + rb": .*$", name + b": " + raw, frame, count=1)


BIG_BLOCK = b"X-Pad: " + b"a" * (2 << 20)
# (name, what FreeSWITCH's side sends instead of, or after, its connect reply, the log line's
# protocol error). "after" cases answer the worker's linger (sent to every full call) with it.
HOSTILE = [
    ("malformed Content-Length", "instead",
     b"Content-Type: command/reply\nContent-Length: many\n\n", "invalid Content-Length 'many'"),
    ("oversized frame", "instead", b"Content-Type: api/response\nContent-Length: 9000000\n\n",
     "Content-Length 9000000 exceeds the 8388608-byte limit"),
    ("2 GiB Content-Length", "instead",
     b"Content-Type: api/response\nContent-Length: %d\n\n" % (2 * GIB),
     "Content-Length 2147483648 exceeds the 8388608-byte limit"),
    ("2 GiB Content-Length mid-call", "after",
     b"Content-Type: command/reply\nContent-Length: %d\n\n" % (2 * GIB),
     "Content-Length 2147483648 exceeds the 8388608-byte limit"),
    ("100 000 headers", "instead", b"h: v\n" * 100_000 + b"\n",
     "header block of 100000 lines exceeds the 10000-line limit (--max-headers)"),
    ("header block without end", "instead", BIG_BLOCK,
     "header block exceeds 1048576 bytes without ending"),
    ("300 KB line", "instead", b"X: " + b"a" * 300_000 + b"\n\n",
     "header block has a line of 300003 bytes, over the 262144-byte limit (--max-line-length)"),
    ("truncated frame", "instead", b"Content-Type: command/re",
     "a frame was not complete within 1.0s (--frame-timeout)"),
    ("TLS hello", "instead", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32)),
     "a frame was not complete within 1.0s (--frame-timeout)"),
    ("NUL byte", "instead", b"Content-Type: command/reply\nReply-Text: +OK\x00\n\n",
     "NUL byte in the header block at offset 43"),
    ("NUL byte in an event", "after", protocol.event_frame(
        [("Event-Name", "CUSTOM")]).replace(b"CUSTOM", b"CUS\x00TOM"),
     "NUL byte in the event header block at offset 15"),
    ("invalid UTF-8", "instead", replace_value(channel_data("u"), b"Channel-State", b"\xff\xfe"),
     "invalid UTF-8 in the channel data at offset 53"),
    ("newline in Unique-ID", "instead", channel_data("abc\nINFO forged line"),
     "the connect reply's Unique-ID is unusable: abc\\x0aINFO forged line"),
    ("invalid percent-escapes", "instead",
     channel_data("e", ("Caller-Caller-ID-Name", "Bob")).replace(b"Bob", b"%zz%E2%82%"),
     "invalid percent-escape b'%zz' in the channel data at offset 87"),
]


def hostile_call(address, when: str, payload: bytes, index: int) -> tuple[bytes, float]:
    """Play a hostile FreeSWITCH: what the gateway sent, and how long it kept the socket."""
    sock = gsocket.create_connection(address, timeout=10)
    try:
        opened = time.monotonic()
        assert sock.recv(64) == b"connect\n\n"
        if when == "after":
            sock.sendall(channel_data(f"hostile-{index}"))
            command = sock.recv(4096)
            assert command.startswith(b"linger"), command
        try:
            sock.sendall(payload)
        except OSError:
            pass   # closed while we were still sending (the 2 MB block): that is the point
        return read_until_closed(sock, 10), time.monotonic() - opened
    finally:
        sock.close()


def test_hostile_freeswitch_input_ends_only_that_call(start_gateway):
    """14 kinds of bad input on one worker while 100 real calls run on it: each bad call ends
    with exactly its protocol-error line, every real call completes, the worker lives on."""
    gateway = start_gateway(workers=1, args=["--frame-timeout", "1"])
    pid, = gateway.worker_pids()
    load = gevent.spawn(run_load, gateway.address, 100, 50, None, None, 16)
    hostile = [gevent.spawn(hostile_call, gateway.address, when, payload, index)
               for index, (_, when, payload, _) in enumerate(HOSTILE)]
    gevent.joinall(hostile, raise_error=True)
    assert_all_completed(load.get(timeout=60), 100)
    for (name, *_), call in zip(HOSTILE, hostile):
        sent, _ = call.value
        assert sent == b"", (name, sent)   # nothing more: the call was closed
    log = gateway.log()
    errors = re.findall(r"protocol error from FreeSWITCH: (.*); closing this call", log)
    assert sorted(errors) == sorted(message for *_, message in HOSTILE), errors
    assert "Traceback" not in log and "internal error" not in log
    assert "INFO forged line" not in log.replace("\\x0aINFO forged line", "")
    assert gateway.worker_pids() == [pid]
    stats = wait_until(lambda: (s := gateway.stats())["totals"]["calls"] == 100 + len(HOSTILE)
                       and s["totals"]["calls_active"] == 0 and s, what="stats caught up")
    assert stats["totals"]["completed"] == 100
    assert stats["totals"]["protocol_errors"] == len(HOSTILE)
    assert stats["totals"]["failed"] == len(HOSTILE)


def test_500_silent_peers_cost_no_call_slot_and_are_closed_at_the_handshake_timeout(
        start_gateway):
    """500 connections that never answer `connect`, on one worker with 100 call slots, then 200
    real calls at 100/s: every real call is answered within well under the handshake timeout
    (the silent ones ahead of them in the queue hold a slot for 0.1 s each, 100 at a time), the
    silent ones are closed after the 2 s handshake timeout, counted exactly, and logged in one
    line."""
    gateway = start_gateway(workers=1, args=["--handshake-timeout", "2",
                                             "--worker-connections", "100"])
    silent = [gsocket.create_connection(gateway.address) for _ in range(500)]
    opened = time.monotonic()
    try:
        result = run_load(gateway.address, 200, 100, None, None, 17)
        assert_all_completed(result, 200)
        slowest = max(r.first_byte_ms for r in result.results)
        p50, p99 = (result.percentile("first_byte_ms", q) for q in (0.5, 0.99))
        print(f"\nbeside 500 silent peers: first byte p50 {p50:.1f} ms, p99 {p99:.1f} ms, "
              f"max {slowest:.1f} ms")
        assert slowest < 1000, f"a real call waited {slowest:.0f} ms for its connect"
        assert time.monotonic() - opened < 2 + 2.5   # the load did not wait for the timeout
        closed = [gevent.spawn(read_until_closed, sock, 10) for sock in silent]
        gevent.joinall(closed, raise_error=True)
        assert [c.value for c in closed] == [b"connect\n\n"] * 500
        assert time.monotonic() - opened >= 2
    finally:
        for sock in silent:
            sock.close()
    stats = wait_until(lambda: (s := gateway.stats())["totals"]["handshake_timeouts"] == 500 and s,
                       what="500 handshake timeouts counted")
    assert stats["totals"]["completed"] == 200
    assert stats["totals"]["calls_active"] == 0
    lines = re.findall(r"closed a connection that did not answer connect within 2.0s "
                       r"\(--handshake-timeout\) \((\d+) more since the last report\)",
                       gateway.log())
    assert lines == ["0"], lines   # the other 499 fell within the first line's 10 s


def test_at_max_handshakes_a_worker_stops_accepting_until_they_time_out(start_gateway):
    """--max-handshakes 10 and 10 silent connections: once they are past their grace the worker
    stops accepting (logged), so a real call waits in the queue until the silent ones are
    closed at the 1 s timeout."""
    gateway = start_gateway(workers=1, args=["--handshake-timeout", "1", "--max-handshakes",
                                             "10"])
    silent = [gsocket.create_connection(gateway.address, timeout=5) for _ in range(10)]
    try:
        gateway.wait_for_log(r"10 connections wait for their channel data \(--max-handshakes\): "
                             r"not accepting until some answer or time out \(0 more since the "
                             r"last report\)")
        result = run_load(gateway.address, 1, None, None, None, 19)
        assert_all_completed(result, 1)
        assert result.results[0].first_byte_ms > 500   # it waited for the silent ones
        assert [read_until_closed(sock, 5) for sock in silent] == [b"connect\n\n"] * 10
    finally:
        for sock in silent:
            sock.close()


def test_a_peer_outside_allow_gets_no_connect_and_is_closed(start_gateway):
    """From 127.0.0.2 with --allow 127.0.0.1/32: closed before a byte is sent, three times,
    counted three times, logged once; a call from 127.0.0.1 is served as usual."""
    gateway = start_gateway(workers=1, args=["--allow", "127.0.0.1/32"])
    for _ in range(3):
        sock = gsocket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.2", 0))
        sock.connect(gateway.address)
        assert read_until_closed(sock, 5) == b""
        sock.close()
    assert_all_completed(run_load(gateway.address, 5, 50, None, None, 18), 5)
    wait_until(lambda: gateway.stats()["totals"]["peers_refused"] == 3, what="3 refusals counted")
    lines = re.findall(r"refused a connection from 127\.0\.0\.2: not in --allow, closed before a "
                       r"byte was sent \(0 more since the last report\)", gateway.log())
    assert len(lines) == 1
    status, body = gateway.http_get("/metrics")
    assert "esl_gateway_peers_refused_total 3.0" in body.decode()


def http(address, request: bytes) -> tuple[int, bytes]:
    with gsocket.create_connection(address, timeout=5) as sock:
        sock.sendall(request)
        data = read_until_closed(sock, 5)
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), head + b"\r\n\r\n" + body


def test_stats_endpoint_with_a_token_file(start_gateway, tmp_path):
    """With --stats-token-file: 401 without or with a wrong token, 200 with it (GET and HEAD),
    405 for other methods, 413 for a body, 431 for a huge head; a reload re-reads the file."""
    token_file = tmp_path / "token"
    token_file.write_text("first-secret\n")
    gateway = start_gateway(workers=1, args=["--stats-token-file", str(token_file)])
    address = gateway.stats_address

    def get(token=None, method=b"GET", extra=b""):
        auth = b"" if token is None else b"Authorization: Bearer " + token + b"\r\n"
        return http(address, method + b" /stats HTTP/1.0\r\n" + auth + extra + b"\r\n")[0]

    assert [get(), get(b"wrong"), get(b"first-secret"), get(b"first-secret", b"HEAD")] == \
        [401, 401, 200, 200]
    assert get(b"first-secret", b"POST") == 405
    assert get(b"first-secret", extra=b"Content-Length: 5\r\n") == 413
    assert http(address, b"GET /stats HTTP/1.0\r\nX: " + b"a" * 9000)[0] == 431
    status, answer = http(address, b"GET /stats HTTP/1.0\r\n\r\n")
    assert b"WWW-Authenticate: Bearer" in answer
    token_file.write_text("second-secret")
    gateway.signal(signal.SIGHUP)
    gateway.wait_for_log(r"ready, generation 2")
    assert [get(b"first-secret"), get(b"second-secret")] == [401, 200]


def test_a_stats_endpoint_beyond_loopback_without_a_token_is_warned_about(start_gateway):
    gateway = start_gateway(workers=1, args=["--stats", "0.0.0.0:0"], wait_ready=False)
    gateway.wait_for_log(r"the stats endpoint listens beyond loopback without a token: whoever "
                         r"reaches 0\.0\.0\.0:\d+ reads the gateway's state")


# -- the privilege drop ------------------------------------------------------------------------

def _as_user_can_run(python: str, user: str, env: dict) -> bool:
    try:
        done = subprocess.run([python, "-c", "import gevent, msgpack, prometheus_client"],
                              user=user, cwd="/", capture_output=True, timeout=60,
                              env={"PATH": "/usr/bin:/bin", **env})
    except PermissionError:
        return False
    return done.returncode == 0


@pytest.fixture(scope="module")
def python_for_nobody():
    """(python, environment) ``nobody`` can run (an upgrade re-executes it as that user): ours
    if it can, else a hard-linked copy of our Python's install (about 2 s, no space) outside a
    directory ``nobody`` cannot enter, its shared library found first, with a venv that sees
    our site-packages."""
    if os.geteuid() != 0:
        pytest.skip("dropping privileges needs the suite to run as root")
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody on this machine")
    if _as_user_can_run(sys.executable, "nobody", {}):
        yield sys.executable, {}
        return
    place = Path(tempfile.mkdtemp(prefix="esl-gw-python-"))
    try:
        place.chmod(0o755)
        subprocess.run(["cp", "-al", sys.base_prefix, str(place / "python")], check=True)
        base = place / "python" / "bin" / Path(sys._base_executable).name
        subprocess.run([str(base), "-m", "venv", "--without-pip", str(place / "venv")],
                       check=True)
        ours = next(p for p in sys.path if p.endswith("site-packages") and
                    p.startswith(sys.prefix))
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        (place / "venv" / "lib" / version / "site-packages" / "esl_gateway_test.pth").write_text(
            f"import site; site.addsitedir({ours!r})\n")
        python = str(place / "venv" / "bin" / "python")
        # Before the RUNPATH that points into the original install:
        env = {"LD_LIBRARY_PATH": str(place / "python" / "lib")}
        if not _as_user_can_run(python, "nobody", env):
            pytest.skip(f"nobody cannot run Python even from {place} (our site-packages "
                        f"{ours} must be readable by it)")
        yield python, env
    finally:
        shutil.rmtree(place, ignore_errors=True)


def ids(pid: int) -> tuple[str, str, str]:
    """A process's Uid:, Gid: and Groups: lines from /proc/PID/status."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text()
                  .splitlines() if ":" in line)
    return tuple(" ".join(status[key].split()) for key in ("Uid", "Gid", "Groups"))


def test_after_dropping_to_nobody_workers_run_as_it_and_reload_and_upgrade_work(
        python_for_nobody):
    """Started as root with --user nobody: the master and every worker run as nobody (real,
    effective, saved and filesystem ids; no supplementary group of root's), calls are served,
    and a reload (HUP) and an in-place upgrade (USR2, a re-exec as nobody) serve calls too."""
    nobody = pwd.getpwnam("nobody")
    expected = (f"{nobody.pw_uid} " * 4).strip(), (f"{nobody.pw_gid} " * 4).strip()
    python, env = python_for_nobody
    workdir = Path(tempfile.mkdtemp(prefix="esl-gw-nobody-"))
    workdir.chmod(0o777)   # the test app writes its records here, as nobody
    pidfile = workdir / "gw.pid"
    gateway = GatewayProcess(workdir, "reporting_ivr:handle", 2,
                             ["--user", "nobody", "-p", str(pidfile)], env,
                             command=[python, "-m", "gateway"])
    try:
        gateway.start()
        assert ids(gateway.pid)[:2] == expected
        assert pidfile.stat().st_uid == nobody.pw_uid
        for generation, how in ((1, None), (2, signal.SIGHUP), (3, signal.SIGUSR2)):
            if how is not None:
                gateway.signal(how)
                gateway.wait_for_log(rf"ready, generation {generation}", count=2, timeout=60)
                wait_until(lambda: len(gateway.worker_pids()) == 2, timeout=30,
                           what="the old generation gone")
            workers = gateway.worker_pids()
            assert len(workers) == 2
            for pid in [gateway.pid, *workers]:
                uid, gid, groups = ids(pid)
                assert (uid, gid) == expected, (generation, pid)
                assert "0" not in groups.split(), groups   # root's groups are gone too
            assert_all_completed(run_load(gateway.address, 20, 50, None, None, generation), 20)
        assert "upgraded in place" in gateway.log()
        assert "dropped privileges: now user nobody" in gateway.log()
        assert "Traceback" not in gateway.log()
        gateway.stop()
        assert gateway.proc.returncode == 0
        assert not pidfile.exists()   # removed by the master, as nobody, on its way out
    finally:
        gateway.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_dropping_privileges_without_root_is_refused_before_serving(python_for_nobody,
                                                                   tmp_path):
    """Not root and asked to become another user: the master says why and exits before it
    starts a single worker."""
    python, env = python_for_nobody
    done = subprocess.run([python, "-m", "gateway", "run", "-b", "127.0.0.1:0",
                           "--stats", "none", "--user", "root", "reporting_ivr:handle"],
                          user="nobody", cwd="/", capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": os.pathsep.join([str(APPS), str(ROOT)]),
                               "PATH": "/usr/bin:/bin", **env})
    assert done.returncode == 1
    assert "cannot drop privileges: switching to user root needs root" in done.stderr
    assert "ready, generation" not in done.stderr
