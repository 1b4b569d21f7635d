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
from gateway.backoff import CRASH_WINDOW, RespawnBackoff
from workers.base import EXIT_BOOT_ERROR, EXIT_CRASH, WorkerSpec, child_main, set_title

log = logging.getLogger("esl_gateway.master")

LOOP_TICK = 1.0   # at most; the loop wakes sooner for signals, messages and a short --timeout
ABORT_GRACE = 2.0        # SIGABRT (faulthandler dumps the stack) before SIGKILL for a hung worker
QUICK_STOP_SECONDS = 5.0
GRACE_AFTER_GRACEFUL_TIMEOUT = 5.0
EXIT_HISTORY = 100
COUNTER_KEYS = ("calls", "failed", "handler_exceptions", "protocol_errors", "events", "commands",
                "accept_errors")
GAUGE_KEYS = ("active", "longest_block_ms")


class WorkerRecord:
    """The master's view of one worker process."""

    def __init__(self, pid: int, slot: int, generation: int, channel: socket.socket):
        self.pid, self.slot, self.generation, self.channel = pid, slot, generation, channel
        self.reader = ipc.MessageReader()
        self.started = time.monotonic()
        self.last_heartbeat = self.started
        self.state = "booting"          # booting, ready, draining
        self.ready_at: float | None = None
        self.counters: dict[str, int] = {}
        self.traceback: str | None = None
        self.exit_reason: str | None = None
        self.aborted_at: float | None = None   # when it was found hung and sent SIGABRT


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
        self.backoff = RespawnBackoff()
        self.stopping = False
        self.graceful_stop = True
        self.stop_deadline = 0.0
        self.listeners: list[socket.socket] = []
        self.selector = selectors.DefaultSelector()
        self.tick = min(LOOP_TICK, (config.timeout or LOOP_TICK) / 4)

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
            next_spawn = self.backoff.next_spawn_in(time.monotonic())
            self._wait(min(self.tick, LOOP_TICK if next_spawn is None else next_spawn))
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
        self.config.workers += 1
        log.info("TTIN: %d worker(s) wanted", self.config.workers)

    def handle_ttou(self) -> None:
        if self.config.workers > 1:
            self.config.workers -= 1
            log.info("TTOU: %d worker(s) wanted; the extra one drains its calls",
                     self.config.workers)

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
        """Fill every empty slot (unless it is backing off), drain workers beyond the count.

        A draining worker no longer holds its slot: its replacement starts at once, so capacity
        never drops while it finishes its calls.
        """
        now = time.monotonic()
        serving = [w for w in self.workers.values()
                   if w.generation == self.generation and w.state != "draining"]
        for record in serving:
            if record.slot > self.config.workers:
                record.state = "draining"
                _kill(record.pid, signal.SIGTERM)
        self.backoff.forget_slots_above(self.config.workers)
        taken = {w.slot for w in serving}
        for slot in range(1, self.config.workers + 1):
            if slot not in taken and self.backoff.may_spawn(slot, now):
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
            record.counters = {key: int(message.get(key, 0)) for key in COUNTER_KEYS + GAUGE_KEYS}
        elif kind == "ready":
            record.state, record.ready_at = "ready", time.monotonic()
        elif kind == "draining":
            record.state = "draining"
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
        now = time.monotonic()
        uptime = now - record.started
        entry = {"time": time.time(), "pid": record.pid, "slot": record.slot,
                 "generation": record.generation, "classification": classification,
                 "detail": detail, "uptime": round(uptime, 3), "traceback": record.traceback}
        self.exits.append(entry)
        message = (f"worker {record.slot} (pid {record.pid}, gen {record.generation}) "
                   f"{detail} after {uptime:.1f}s")
        if record.traceback:
            message += f"; its last traceback:\n{record.traceback.rstrip()}"
        if classification in CLEAN_EXITS:
            log.info(message)
        else:
            log.error(message)
        if self.stopping or record.generation != self.generation or record.state == "draining":
            return
        delay = self.backoff.record_exit(record.slot, is_early_death(record, classification, now),
                                         now)
        failures = self.backoff.failures.get(record.slot, 0)
        if failures > 1:
            log.error("slot %d is crash-looping: %d early deaths in a row; next attempt in "
                      "%.1fs (the port stays bound, other workers keep serving)",
                      record.slot, failures, delay)

    def murder_workers(self) -> None:
        """Kill workers whose event loop has stopped sending heartbeats for --timeout seconds.

        A loop that waits on I/O still ticks; only a blocked loop goes silent. SIGABRT first:
        the worker's faulthandler writes every thread's stack to stderr, showing what blocked.
        """
        timeout = self.config.timeout
        if not timeout:
            return
        now = time.monotonic()
        for record in list(self.workers.values()):
            silent = now - record.last_heartbeat
            if record.aborted_at is None and silent > timeout:
                log.error("worker %d (pid %d) sent no heartbeat for %.1fs (timeout %.0fs): its "
                          "event loop is blocked; aborting it (its stack follows on stderr)",
                          record.slot, record.pid, silent, timeout)
                record.aborted_at = now
                _kill(record.pid, signal.SIGABRT)
            elif record.aborted_at is not None and now - record.aborted_at > ABORT_GRACE:
                _kill(record.pid, signal.SIGKILL)

    def _signal_workers(self, signum: int) -> None:
        for pid in list(self.workers):
            _kill(pid, signum)


# Exit reasons a worker announces before leaving on purpose (its "draining" message).
CLEAN_EXITS = ("clean", "recycled", "drained", "stopped", "orphaned", "retired")
# Signals that come from outside (an operator, the OOM killer, us), not from a bug in the worker.
EXTERNAL_SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


def classify_exit(status: int, record: WorkerRecord) -> tuple[str, str]:
    """(classification, human detail) for a reaped worker's wait status."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        name = signal.Signals(signum).name if signum in signal.valid_signals() else str(signum)
        if record.aborted_at is not None:
            return "killed_as_hung", f"was killed as hung ({name})"
        if signum in EXTERNAL_SIGNALS:
            return "killed", f"was killed by signal {signum} ({name})"
        return "crashed", f"crashed with signal {signum} ({name})"
    code = os.WEXITSTATUS(status)
    if code == 0:
        reason = record.exit_reason if record.exit_reason in CLEAN_EXITS else "clean"
        return reason, f"exited cleanly ({reason})"
    if code == EXIT_BOOT_ERROR:
        return "boot_error", f"could not load the app (exit {code})"
    return "crashed", f"crashed (exit {code})"


def is_early_death(record: WorkerRecord, classification: str, now: float) -> bool:
    """Did this worker die of itself before, or soon after, becoming ready (a crash loop)?

    A kill from outside (an operator, the OOM killer) is never the app's fault.
    """
    if classification in CLEAN_EXITS or classification == "killed":
        return False
    return record.ready_at is None or now - record.ready_at < CRASH_WINDOW


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass   # already gone; the reaper will record how
