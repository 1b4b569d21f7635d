"""Run the real ``esl-gateway`` master as a subprocess for integration and chaos tests.

The master binds port 0 and logs the address it got; the test reads it from the log file (stderr
goes to a file, so a chatty gateway can never block on a full pipe). Every wait is for a condition
in that log or in /proc, with a deadline, and waits cooperatively (gevent.sleep) so simulated calls
running in the test's greenlets keep going meanwhile. The master runs in its own process group so ``stop()``
can always clean up every worker, even after a test failure.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import gevent

APPS = Path(__file__).parent / "apps"
ROOT = Path(__file__).parent.parent


def wait_until(condition, timeout: float = 10.0, what: str = "condition", poll: float = 0.02):
    """Wait cooperatively until ``condition()`` is true, failing the test after ``timeout``;
    return its value."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what} not met within {timeout}s"
        gevent.sleep(poll)
    return value


def run_command(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` in the hub's thread pool: the calling greenlet waits, the simulated
    calls in the others go on. Not gevent's subprocess: its child watcher makes the event loop
    reap every child of the test process, so a test could no longer wait for a process of its
    own (the orphaned workers a subreaper adopts, a master's exit status)."""
    return gevent.get_hub().threadpool.apply(subprocess.run, (args,), kwargs)


def gateway_command() -> list[str]:
    script = Path(sys.executable).with_name("esl-gateway")
    return [str(script)] if script.exists() else [sys.executable, "-m", "gateway"]


class GatewayProcess:
    def __init__(self, workdir: Path, app: str, workers: int = 2, args=(), env=None,
                 max_open_files: int | None = None, listen_socks=(), command=None):
        self.command = command or gateway_command()   # another interpreter's, for --user tests
        self.max_open_files = max_open_files
        self.listen_socks = list(listen_socks)   # [(socket, name)] passed as systemd would
        self.workdir, self.app, self.workers, self.args = workdir, app, workers, list(args)
        self.log_path = workdir / "gateway.log"
        self.record_path = workdir / "handlers.txt"
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(APPS), str(ROOT)]),
                        ESL_TEST_RECORD=str(self.record_path), **(env or {}))
        self.proc: subprocess.Popen | None = None
        self.address: tuple[str, int] | None = None

    def start(self, wait_ready: bool = True) -> "GatewayProcess":
        bind = [] if "-b" in self.args else ["-b", "127.0.0.1:0"]
        stats = [] if "--stats" in self.args else ["--stats", "127.0.0.1:0"]
        command = [*self.command, "run", *bind, "-w", str(self.workers), *stats,
                   *self.args, self.app]
        env = dict(self.env)
        if self.listen_socks:
            # systemd sets LISTEN_PID to the PID it execs; `exec` in sh keeps the shell's.
            command = ["/bin/sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", *command]
            env.update(LISTEN_FDS=str(len(self.listen_socks)),
                       LISTEN_FDNAMES=":".join(name for _, name in self.listen_socks))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir,
                start_new_session=True, preexec_fn=self._prepare_child,
                # Python's own fds are not inheritable; only the dup2 copies below cross exec.
                close_fds=not self.listen_socks)
        if wait_ready:
            match = self.wait_for_log(r"Listening at: (127\.[\d.]+):(\d+)")
            self.address = (match[-1].group(1), int(match[-1].group(2)))
            if "none" not in self.args:
                match = self.wait_for_log(r"Stats at: http://127\.0\.0\.1:(\d+)/")
                self.stats_address = ("127.0.0.1", int(match[-1].group(1)))
            self.wait_for_log(r"ready, generation", count=self.workers)
        return self

    def _prepare_child(self) -> None:
        """In the child before exec: resource limits, and inherited sockets at fd 3, 4 ..."""
        if self.max_open_files:
            resource.setrlimit(resource.RLIMIT_NOFILE, (self.max_open_files,) * 2)
        # dup first, then place: a socket's own number may be one of the targets.
        copies = [os.dup(sock.fileno()) for sock, _ in self.listen_socks]
        for index, fd in enumerate(copies):
            os.dup2(fd, 3 + index)

    def cpu_seconds(self, pid: int | None = None) -> float:
        """User + system CPU time of a process so far, from /proc."""
        fields = Path(f"/proc/{pid or self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern: str, count: int = 1, timeout: float = 20.0) -> list:
        """Wait until ``pattern`` matches ``count`` times in the log; return the matches."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            matches = list(regex.finditer(self.log()))
            if len(matches) >= count:
                return matches
            if self.proc.poll() is not None and len(matches) < count:
                raise AssertionError(f"gateway exited ({self.proc.returncode}) before "
                                     f"{pattern!r} x{count}; log:\n{self.log()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} seen {len(matches)}/{count} times in "
                                     f"{timeout}s; log:\n{self.log()[-4000:]}")
            gevent.sleep(0.02)

    def worker_pids(self, role: str = r"worker \d+") -> list[int]:
        """The master's children whose process title matches ``role`` (default: workers in a
        slot; ``worker spare`` for spares, ``fork server`` for fork servers)."""
        path = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        pids = []
        for pid in path.read_text().split():
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue   # it just exited
            if re.match(rf"esl-gateway: {role}\b", title):
                pids.append(int(pid))
        return pids

    def http_get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        """GET from the stats endpoint (cooperatively, so simulated calls keep running)."""
        from gevent import socket as gsocket
        with gsocket.create_connection(self.stats_address, timeout=timeout) as sock:
            sock.sendall(f"GET {path} HTTP/1.0\r\nHost: test\r\n\r\n".encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), body

    def stats(self) -> dict:
        status, body = self.http_get("/stats")
        assert status == 200, body
        return json.loads(body)

    def handler_records(self) -> tuple[set[str], list[tuple[int, str, str, float]]]:
        """(uuids of handlers that started, [(pid, uuid, how it ended, seconds)] of returns)."""
        started, ended = set(), []
        if self.record_path.exists():
            for line in self.record_path.read_text().splitlines():
                pid, uuid, status, seconds = line.split()
                if status == "started":
                    started.add(uuid)
                else:
                    ended.append((int(pid), uuid, status, float(seconds)))
        return started, ended

    def wait_handlers_returned(self, timeout: float = 20.0) -> list:
        """Wait until every handler that started has returned; return how each ended."""
        deadline = time.monotonic() + timeout
        while True:
            started, ended = self.handler_records()
            if started == {uuid for _, uuid, _, _ in ended} and len(ended) == len(started):
                return ended
            if time.monotonic() > deadline:
                stuck = started - {uuid for _, uuid, _, _ in ended}
                raise AssertionError(f"{len(stuck)} of {len(started)} handlers never returned "
                                     f"within {timeout}s, e.g. {sorted(stuck)[:3]}")
            gevent.sleep(0.02)

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """Graceful stop, then kill the whole process group if anything is left."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass   # the group is already empty
        self.proc.wait(5)
