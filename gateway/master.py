"""The master: holds the listening sockets for its whole life and keeps workers on them.

Small and boring on purpose, in the shape of gunicorn's arbiter. Signal handlers only queue the
signal and write a byte to a self-pipe; one loop waits on that pipe and on the workers' sockets,
then runs ``handle_<signal>`` methods, reaps, murders hung workers and spawns missing ones. The
master never serves a call and never imports gevent or the user's app, so nothing a call does can
take the port down: while a worker is replaced, new calls wait in the kernel's accept queue.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import time
import traceback
from collections import deque

from gateway import ipc, listeners
from workers.base import EXIT_BOOT_ERROR, EXIT_CRASH, WorkerSpec, child_main, set_title

log = logging.getLogger("esl_gateway.master")

LOOP_TICK = 1.0
QUICK_STOP_SECONDS = 5.0
GRACE_AFTER_GRACEFUL_TIMEOUT = 5.0
EXIT_HISTORY = 100
COUNTER_KEYS = ("calls", "failed", "handler_exceptions", "protocol_errors", "events", "commands",
                "accept_errors")


class WorkerRecord:
    """The master's view of one worker process."""

    def __init__(self, pid: int, slot: int, generation: int, channel: socket.socket):
        self.pid, self.slot, self.generation, self.channel = pid, slot, generation, channel
        self.reader = ipc.MessageReader()
        self.started = time.monotonic()
        self.last_heartbeat = self.started
        self.state = "booting"
        self.counters: dict[str, int] = {}
        self.traceback: str | None = None
        self.exit_reason: str | None = None
        self.killed_as_hung = False


class Master:
    SIGNALS = ("CHLD", "HUP", "INT", "QUIT", "TERM", "TTIN", "TTOU", "USR1", "USR2", "WINCH")

    def __init__(self, config, worker_class: str):
        self.config = config
        self.worker_class = worker_class
        self.workers: dict[int, WorkerRecord] = {}
        self.generation = 1
        self.exits: deque[dict] = deque(maxlen=EXIT_HISTORY)
        self.dead_totals = dict.fromkeys(COUNTER_KEYS, 0)   # counts of workers that are gone
        self.signal_queue: deque[int] = deque()
        self.stopping = False
        self.graceful_stop = True
        self.stop_deadline = 0.0
        self.listeners: list[socket.socket] = []
        self.selector = selectors.DefaultSelector()

    # -- start and run ----------------------------------------------------------------------

    def run(self) -> int:
        self.listeners = [listeners.bind(addr, self.config.backlog) for addr in self.config.bind]
        for sock in self.listeners:
            log.info("Listening at: %s (pid %d)", listeners.describe(sock), os.getpid())
        self._init_signals()
        set_title(f"master [gen {self.generation}] "
                  + " ".join(listeners.describe(sock) for sock in self.listeners))
        log.info("master %d starting %d worker(s) for %s", os.getpid(), self.config.workers,
                 self.config.app)
        while True:
            if not self.stopping:
                self.manage_workers()
            self._wait(LOOP_TICK)
            while self.signal_queue:
                name = signal.Signals(self.signal_queue.popleft()).name[3:].lower()
                getattr(self, f"handle_{name}")()
            if self.stopping:
                if not self.workers:
                    break
                if time.monotonic() > self.stop_deadline:
                    log.warning("%d worker(s) still running at the stop deadline; killing them",
                                len(self.workers))
                    self._signal_workers(signal.SIGKILL)
                    self.stop_deadline = float("inf")
            else:
                self.murder_workers()
        for sock in self.listeners:
            sock.close()
        log.info("master %d stopped", os.getpid())
        return 0

    def _init_signals(self) -> None:
        self.pipe_r, self.pipe_w = os.pipe()
        os.set_blocking(self.pipe_r, False)
        os.set_blocking(self.pipe_w, False)
        self.selector.register(self.pipe_r, selectors.EVENT_READ, None)
        for name in self.SIGNALS:
            signal.signal(getattr(signal, f"SIG{name}"), self._queue_signal)

    def _queue_signal(self, signum, _frame) -> None:
        self.signal_queue.append(signum)
        try:
            os.write(self.pipe_w, b".")
        except BlockingIOError:
            pass   # the pipe is full of wake-ups already; the loop will see the queue

    def _wait(self, timeout: float) -> None:
        for key, _ in self.selector.select(timeout):
            if key.data is None:
                try:
                    while os.read(self.pipe_r, 4096):
                        pass
                except BlockingIOError:
                    pass   # drained
            else:
                self._read_channel(key.data)

    # -- signals ----------------------------------------------------------------------------

    def handle_chld(self) -> None:
        self.reap_workers()

    def handle_term(self) -> None:
        self.stop(graceful=True)

    def handle_int(self) -> None:
        self.stop(graceful=False)

    def handle_quit(self) -> None:
        self.stop(graceful=False)

    def handle_hup(self) -> None:
        log.warning("HUP (reload) is not supported yet; ignoring it")

    def handle_usr2(self) -> None:
        log.warning("USR2 (upgrade) is not supported yet; ignoring it")

    def handle_ttin(self) -> None:
        log.warning("TTIN (add a worker) is not supported yet; ignoring it")

    def handle_ttou(self) -> None:
        log.warning("TTOU (remove a worker) is not supported yet; ignoring it")

    def handle_usr1(self) -> None:
        log.info("USR1: logs go to stderr, there is nothing to reopen")

    def handle_winch(self) -> None:
        pass   # terminal resize: never a reason to touch workers

    def stop(self, graceful: bool) -> None:
        if self.stopping and (graceful or not self.graceful_stop):
            return
        self.stopping, self.graceful_stop = True, graceful
        wait = (self.config.graceful_timeout + GRACE_AFTER_GRACEFUL_TIMEOUT if graceful
                else QUICK_STOP_SECONDS)
        self.stop_deadline = time.monotonic() + wait
        log.info("%s stop: %d worker(s) to finish", "graceful" if graceful else "quick",
                 len(self.workers))
        self._signal_workers(signal.SIGTERM if graceful else signal.SIGQUIT)

    # -- workers ----------------------------------------------------------------------------

    def manage_workers(self) -> None:
        """Spawn a worker into every empty slot of the current generation."""
        taken = {w.slot for w in self.workers.values() if w.generation == self.generation}
        for slot in range(1, self.config.workers + 1):
            if slot not in taken:
                self.spawn_worker(slot)

    def spawn_worker(self, slot: int) -> None:
        master_end, worker_end = socket.socketpair()
        spec = WorkerSpec(slot=slot, generation=self.generation, config=self.config,
                          listeners=self.listeners, channel=worker_end)
        pid = os.fork()
        if pid == 0:
            try:
                self._release_in_child(master_end)
                child_main(spec, self.worker_class)
            finally:
                os._exit(EXIT_CRASH)
        worker_end.close()
        master_end.setblocking(False)
        record = WorkerRecord(pid, slot, self.generation, master_end)
        self.workers[pid] = record
        self.selector.register(master_end, selectors.EVENT_READ, record)

    def _release_in_child(self, master_end: socket.socket) -> None:
        """In a new worker: drop the master's signal plumbing and every other worker's socket."""
        try:
            signal.set_wakeup_fd(-1)
            for name in self.SIGNALS:
                signal.signal(getattr(signal, f"SIG{name}"), signal.SIG_DFL)
            self.selector.close()
            os.close(self.pipe_r)
            os.close(self.pipe_w)
            for record in self.workers.values():
                record.channel.close()
            master_end.close()
        except BaseException:
            traceback.print_exc()
            raise

    def _read_channel(self, record: WorkerRecord) -> None:
        """Read every message the worker has sent so far; EOF unregisters its socket."""
        while record.channel.fileno() >= 0:
            try:
                data = record.channel.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._forget_channel(record)
                return
            for message in record.reader.feed(data):
                self._on_message(record, message)

    def _forget_channel(self, record: WorkerRecord) -> None:
        if record.channel.fileno() >= 0:
            self.selector.unregister(record.channel)
            record.channel.close()

    def _on_message(self, record: WorkerRecord, message: dict) -> None:
        kind = message.get("t")
        record.last_heartbeat = time.monotonic()
        if kind == "hb":
            record.counters = {key: int(message.get(key, 0)) for key in COUNTER_KEYS}
            record.counters["active"] = int(message.get("active", 0))
        elif kind == "ready":
            record.state = "ready"
        elif kind == "exiting":
            record.state = "exiting"
            record.exit_reason = str(message.get("reason", ""))
        elif kind in ("boot_error", "crash"):
            record.traceback = str(message.get("traceback", ""))

    def reap_workers(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            record = self.workers.pop(pid, None)
            if record is not None:
                self._on_worker_exit(record, status)

    def _on_worker_exit(self, record: WorkerRecord, status: int) -> None:
        # A dying worker's last words (its traceback) may still sit in its socket.
        self._read_channel(record)
        self._forget_channel(record)
        for key in COUNTER_KEYS:
            self.dead_totals[key] += record.counters.get(key, 0)
        classification, detail = classify_exit(status, record)
        uptime = time.monotonic() - record.started
        entry = {"time": time.time(), "pid": record.pid, "slot": record.slot,
                 "generation": record.generation, "classification": classification,
                 "detail": detail, "uptime": round(uptime, 3), "traceback": record.traceback}
        self.exits.append(entry)
        replacing = "" if self.stopping or record.generation != self.generation \
            else "; replacing it"
        message = (f"worker {record.slot} (pid {record.pid}, gen {record.generation}) "
                   f"{detail} after {uptime:.1f}s{replacing}")
        if classification in ("clean", "drained"):
            log.info(message)
        elif record.traceback:
            log.error("%s; its last traceback:\n%s", message, record.traceback.rstrip())
        else:
            log.error(message)

    def murder_workers(self) -> None:
        """Kill workers whose event loop has stopped sending heartbeats for --timeout seconds."""
        timeout = self.config.timeout
        if not timeout:
            return
        now = time.monotonic()
        for record in list(self.workers.values()):
            silent = now - record.last_heartbeat
            if silent > timeout and not record.killed_as_hung:
                log.error("worker %d (pid %d) sent no heartbeat for %.1fs (timeout %.0fs); "
                          "killing it", record.slot, record.pid, silent, timeout)
                record.killed_as_hung = True
                _kill(record.pid, signal.SIGKILL)

    def _signal_workers(self, signum: int) -> None:
        for pid in list(self.workers):
            _kill(pid, signum)


def classify_exit(status: int, record: WorkerRecord) -> tuple[str, str]:
    """(classification, human detail) for a reaped worker's wait status."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        name = signal.Signals(signum).name if signum in signal.valid_signals() else str(signum)
        if record.killed_as_hung:
            return "killed_as_hung", f"was killed as hung ({name})"
        return "killed", f"was killed by signal {signum} ({name})"
    code = os.WEXITSTATUS(status)
    if code == 0:
        reason = record.exit_reason or "exited"
        return ("drained" if record.exit_reason else "clean"), f"exited cleanly ({reason})"
    if code == EXIT_BOOT_ERROR:
        return "boot_error", f"could not load the app (exit {code})"
    return "crashed", f"crashed (exit {code})"


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass   # already gone; the reaper will record how
