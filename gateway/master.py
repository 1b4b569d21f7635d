"""The master: holds the listening sockets for its whole life and keeps workers on them.

Small and boring on purpose, in the shape of gunicorn's arbiter. Signal handlers only queue the
signal and write a byte to a self-pipe; one loop waits on that pipe and on the workers' sockets,
then runs ``handle_<signal>`` methods, reaps, murders hung workers, spawns missing ones and
advances a pending reload. The master never serves a call and never imports gevent or the user's
app, so nothing a call does can take the port down: while a worker is replaced, new calls wait in
the kernel's accept queue.

Workers belong to generations. A reload (HUP) starts generation N+1 with the re-read config and
fresh app code; only when all its workers are ready does N stop accepting and drain. An upgrade
(USR2) re-execs the master itself in place (same PID, see gateway.upgrade) and then does the same
with the new code.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import signal
import socket
import time
import traceback
from collections import deque
from dataclasses import dataclass

from gateway import __version__, ipc, listeners, stats, systemd, upgrade
from gateway.backoff import CRASH_WINDOW, RespawnBackoff
from gateway.httpserver import HTTPServer
from workers.base import EXIT_BOOT_ERROR, EXIT_CRASH, WorkerSpec, child_main, set_title

log = logging.getLogger("esl_gateway.master")

LOOP_TICK = 1.0   # at most; the loop wakes sooner for signals, messages and a short --timeout
ABORT_GRACE = 2.0        # SIGABRT (faulthandler dumps the stack) before SIGKILL for a hung worker
QUICK_STOP_SECONDS = 5.0
GRACE_AFTER_GRACEFUL_TIMEOUT = 5.0
STATUS_INTERVAL = 5.0    # how often STATUS= and the process title are refreshed
EXIT_HISTORY = 100
RECORD_FIELDS = ("pid", "slot", "generation", "started", "last_heartbeat", "state", "ready_at",
                 "counters", "traceback", "exit_reason", "aborted_at", "stopped_accepting")


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
        self.stopped_accepting = False   # it confirmed (its "draining" message) it accepts no more


@dataclass
class Switchover:
    """A promoted generation waiting for the old workers to confirm they stopped accepting:
    only then is the deploy complete (no old code can take a call after that line)."""

    reason: str
    signalled_at: float
    old_generation: int


@dataclass
class PendingReload:
    """A generation that is starting and will replace the current one once all its workers are
    ready, or be abandoned."""

    generation: int
    config: object
    started: float
    reason: str


class Master:
    SIGNALS = ("CHLD", "HUP", "INT", "QUIT", "TERM", "TTIN", "TTOU", "USR1", "USR2", "WINCH")

    def __init__(self, config, worker_class: str, argv: list[str], load_config):
        self.config = config              # the serving generation's; a pending one has its own
        self.worker_class = worker_class
        self.argv = argv                  # our command line, for the upgrade's exec
        self.load_config = load_config    # re-reads the config file (and environment) on reload
        self.workers: dict[int, WorkerRecord] = {}
        self.generation = 1
        self.pending: PendingReload | None = None
        self.switchover: Switchover | None = None
        self.upgrade_check: tuple[int, int] | None = None   # (check pid, state fd)
        self.upgrade_signalled_at = 0.0
        self.exits: deque[dict] = deque(maxlen=EXIT_HISTORY)
        self.exit_counts: dict[str, int] = {}   # by classification, never trimmed
        # The counters of workers that are gone.
        self.dead_totals = dict.fromkeys(ipc.HEARTBEAT_COUNTERS, 0)
        self.reloads = self.reload_failures = self.upgrades = self.upgrade_failures = 0
        self.last_deploy_error: dict | None = None
        self.started_at = time.time()
        self.signal_queue: deque[int] = deque()
        self.backoff = RespawnBackoff()
        self.stopping = False
        self.graceful_stop = True
        self.stop_deadline = 0.0
        self.ready_notified = False
        self.status_at = self.watchdog_at = 0.0
        self.watchdog_interval = systemd.watchdog_interval()   # None unless WatchdogSec= is set
        self.listeners: list[socket.socket] = []
        self.listen_baseline = stats.listen_counters()
        self.stats_server: HTTPServer | None = None
        self.selector = selectors.DefaultSelector()
        self.tick = min(LOOP_TICK, (config.timeout or LOOP_TICK) / 4)

    # -- start and run ----------------------------------------------------------------------

    def run(self, state: dict | None = None) -> int:
        if state is None:
            self.listeners = self._open_listeners()
        else:
            self.restore_state(state)
        for sock in self.listeners:
            log.info("Listening at: %s (pid %d)", listeners.describe(sock), os.getpid())
        self._open_stats(state)
        self._init_signals()
        self._write_pidfile()
        if state is None:
            log.info("master %d (esl-gateway %s) starting %d worker(s) for %s", os.getpid(),
                     __version__, self.config.workers, self.config.app)
        else:
            self.upgrades += 1
            log.info("master %d upgraded in place to esl-gateway %s; starting generation %d",
                     os.getpid(), __version__, self.generation + 1)
            self.start_generation("upgrade", self.config, state["signalled_at"])
        self._title()
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
                self.advance_reload()
            self._report()
        if self.stats_server is not None:
            self.stats_server.close()
        for sock in self.listeners:
            sock.close()
        self._remove_pidfile()
        log.info("master %d stopped", os.getpid())
        return 0

    def _open_listeners(self) -> list[socket.socket]:
        """Sockets from systemd (socket activation or our own fd store), else bound here."""
        inherited = systemd.listen_fds()
        if inherited:
            log.info("using %d listening socket(s) passed by systemd (%s); --bind is not used",
                     len(inherited), ", ".join(name or "unnamed" for _, name in inherited))
            for sock, _ in inherited:
                listeners.tune(sock)
                sock.setblocking(False)
            return [sock for sock, _ in inherited]
        socks = [listeners.bind(addr, self.config.backlog) for addr in self.config.bind]
        if systemd.store_fds(socks, "esl-gateway"):
            log.info("listening sockets stored in systemd's fd store: a master crash or restart "
                     "queues calls instead of refusing them")
        return socks

    def _open_stats(self, state: dict | None) -> None:
        """The stats endpoint; an upgrade hands its listening socket over like the others."""
        if state is not None and state.get("stats_fd") is not None:
            sock = socket.socket(state["stats_family"], socket.SOCK_STREAM,
                                 fileno=state["stats_fd"])
            os.set_inheritable(sock.fileno(), False)
        elif self.config.stats.lower() != "none":
            sock = listeners.bind(self.config.stats, 64)
        else:
            return
        routes = {"/stats": self._serve_stats, "/metrics": self._serve_metrics,
                  "/healthz": self._serve_health}
        self.stats_server = HTTPServer(sock, self.selector, routes)
        log.info("Stats at: http://%s/stats (also /metrics, /healthz)", listeners.describe(sock))

    def _serve_stats(self) -> tuple[int, str, bytes]:
        return 200, "application/json", json.dumps(stats.snapshot(self), indent=1).encode()

    def _serve_metrics(self) -> tuple[int, str, bytes]:
        return 200, "text/plain; version=0.0.4; charset=utf-8", stats.render_metrics(
            stats.snapshot(self))

    def _serve_health(self) -> tuple[int, str, bytes]:
        view = stats.snapshot(self)
        verdict = view["health"]
        return 200 if verdict["ok"] else 503, "text/plain", f"{verdict['reason']}\n".encode()

    def _init_signals(self) -> None:
        self.pipe_r, self.pipe_w = os.pipe()
        os.set_blocking(self.pipe_r, False)
        os.set_blocking(self.pipe_w, False)
        self.selector.register(self.pipe_r, selectors.EVENT_READ, None)
        for name in self.SIGNALS:
            signal.signal(getattr(signal, f"SIG{name}"), self._queue_signal)
        # An upgrade execs us with these blocked so none is lost (or kills us) meanwhile.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self._signal_numbers())

    def _signal_numbers(self) -> set[int]:
        return {getattr(signal, f"SIG{name}") for name in self.SIGNALS}

    def _queue_signal(self, signum, _frame) -> None:
        self.signal_queue.append(signum)
        try:
            os.write(self.pipe_w, b".")
        except BlockingIOError:
            pass   # the pipe is full of wake-ups already; the loop will see the queue

    def _wait(self, timeout: float) -> None:
        for key, mask in self.selector.select(timeout):
            if key.data is None:
                try:
                    while os.read(self.pipe_r, 4096):
                        pass
                except BlockingIOError:
                    pass   # drained
            elif isinstance(key.data, WorkerRecord):
                self._read_channel(key.data)
            else:
                key.data(mask)   # the stats endpoint's sockets
        if self.stats_server is not None:
            self.stats_server.expire(time.monotonic())

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
        self.reload()

    def handle_usr2(self) -> None:
        self.upgrade()

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
        systemd.notify("STOPPING=1")
        log.info("%s stop: %d worker(s) to finish", "graceful" if graceful else "quick",
                 len(self.workers))
        self._signal_workers(signal.SIGTERM if graceful else signal.SIGQUIT)

    # -- reload: a new generation of workers ------------------------------------------------

    def reload(self) -> None:
        """Re-read the config and start a new generation with fresh app code (HUP)."""
        if self.stopping:
            return
        signalled_at = time.monotonic()
        systemd.notify("RELOADING=1", systemd.monotonic_usec())
        try:
            config = self.load_config()
        except Exception as exc:   # a bad config file must not take the master down
            self._deploy_failed("reload", f"the config cannot be used: {exc}")
            return
        if config.bind != self.config.bind:
            log.warning("reload: bind changed (%s); listening sockets are kept as they are, "
                        "a restart rebinds", ", ".join(config.bind))
            config.bind = self.config.bind
        self.start_generation("reload", config, signalled_at)

    def start_generation(self, reason: str, config, signalled_at: float) -> None:
        if self.pending is not None:
            log.warning("%s supersedes the pending %s to generation %d", reason,
                        self.pending.reason, self.pending.generation)
            self._retire_generation(self.pending.generation, signal.SIGTERM)
        generation = max([self.generation, *(w.generation for w in self.workers.values())]) + 1
        self.pending = PendingReload(generation, config, signalled_at, reason)
        log.info("%s: starting generation %d (%d worker(s)); generation %d serves meanwhile",
                 reason, generation, config.workers, self.generation)

    def advance_reload(self) -> None:
        """Promote the pending generation once every slot has a ready worker, or give up; then
        declare the deploy complete once the old workers confirm they stopped accepting."""
        switchover = self.switchover
        if switchover is not None and all(w.stopped_accepting for w in self.workers.values()
                                          if w.generation < self.generation):
            self.switchover = None
            log.info("%s complete: generation %d accepting and generation %d no longer, "
                     "%.2fs after the signal; the old workers drain their calls",
                     switchover.reason, self.generation, switchover.old_generation,
                     time.monotonic() - switchover.signalled_at)
            systemd.notify("READY=1", self._status_line())
        pending = self.pending
        if pending is None:
            return
        waited = time.monotonic() - pending.started
        if len(self._ready_slots(pending.generation)) >= pending.config.workers:
            self._promote(pending)
        elif waited > pending.config.ready_timeout:
            self._abandon(f"generation {pending.generation} was not ready within "
                          f"{pending.config.ready_timeout:.0f}s")

    def _promote(self, pending: PendingReload) -> None:
        old = self.generation
        self.generation, self.config, self.pending = pending.generation, pending.config, None
        if pending.reason == "reload":
            self.reloads += 1
        for record in self.workers.values():
            if record.generation < self.generation and record.state != "draining":
                self._retire(record, signal.SIGTERM)
        self.switchover = Switchover(pending.reason, pending.started, old)
        self._enforce_max_generations()
        self._title()

    def _abandon(self, reason: str, details: str | None = None) -> None:
        pending, self.pending = self.pending, None
        self._retire_generation(pending.generation, signal.SIGTERM)
        self._deploy_failed(pending.reason, reason, details)

    def _deploy_failed(self, kind: str, reason: str, details: str | None = None) -> None:
        if kind == "upgrade":
            self.upgrade_failures += 1
        else:
            self.reload_failures += 1
        self.last_deploy_error = {"time": time.time(), "kind": kind, "reason": reason,
                                  "traceback": details}
        log.error("%s abandoned: %s; generation %d keeps serving%s", kind, reason,
                  self.generation, f"\n{details.rstrip()}" if details else "")
        systemd.notify("READY=1", self._status_line())

    def _retire_generation(self, generation: int, signum: int) -> None:
        for record in self.workers.values():
            if record.generation == generation:
                self._retire(record, signum)

    def _retire(self, record: WorkerRecord, signum: int) -> None:
        """Take a worker out of service: SIGTERM drains its calls, SIGQUIT closes them."""
        record.state = "draining"
        _kill(record.pid, signum)

    def _ready_slots(self, generation: int) -> set[int]:
        return {w.slot for w in self.workers.values()
                if w.generation == generation and w.state == "ready"}

    def _enforce_max_generations(self) -> None:
        """Bound how many generations run at once; the oldest are closed first, cutting calls."""
        generations = sorted({w.generation for w in self.workers.values()})
        while len(generations) > self.config.max_generations:
            oldest = generations.pop(0)
            calls = _active_calls(w for w in self.workers.values() if w.generation == oldest)
            log.warning("more than %d generations running: closing generation %d now, cutting "
                        "its calls (%d at the last heartbeat; its workers log each one; see "
                        "--max-generations)", self.config.max_generations, oldest, calls)
            self._retire_generation(oldest, signal.SIGQUIT)

    # -- upgrade: re-exec the master in place -----------------------------------------------

    def upgrade(self) -> None:
        """Replace this master's code, keeping its PID, sockets and workers (USR2)."""
        if self.stopping or self.upgrade_check is not None:
            return
        if self.pending is not None:
            log.warning("upgrade refused while generation %d is starting; send USR2 again "
                        "once it is ready", self.pending.generation)
            return
        self.upgrade_signalled_at = time.monotonic()
        state_fd = upgrade.write_state(self.export_state())
        pid = upgrade.start_check(self.argv, state_fd)
        self.upgrade_check = (pid, state_fd)
        log.info("upgrade: checking that the new image starts (pid %d)", pid)

    def _on_upgrade_check(self, status: int) -> None:
        _, state_fd = self.upgrade_check
        self.upgrade_check = None
        os.close(state_fd)
        if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
            self._deploy_failed("upgrade", "the new image failed its start-up check (its output "
                                "is above); this master keeps running the old code")
            return
        if self.stopping or self.pending is not None:
            log.warning("upgrade not carried out: the master is stopping or a reload started")
            return
        systemd.notify("RELOADING=1", systemd.monotonic_usec())
        state_fd = upgrade.write_state(self.export_state())
        keep = [sock.fileno() for sock in self.listeners] + [
            w.channel.fileno() for w in self.workers.values() if w.channel.fileno() >= 0]
        if self.stats_server is not None:
            keep.append(self.stats_server.sock.fileno())
        log.info("upgrade: re-executing master %d in place", os.getpid())
        signal.pthread_sigmask(signal.SIG_BLOCK, self._signal_numbers())
        try:
            upgrade.exec_image(self.argv, state_fd, keep)
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self._signal_numbers())
            os.close(state_fd)
            self._deploy_failed("upgrade", f"exec failed: {exc}")

    def export_state(self) -> dict:
        """Everything the next image needs; fds stay open across exec, times are monotonic."""
        return {
            "listeners": [[sock.fileno(), sock.family] for sock in self.listeners],
            "workers": [dict({f: getattr(w, f) for f in RECORD_FIELDS},
                             channel=w.channel.fileno(), pending=bytes(w.reader.pending))
                        for w in self.workers.values() if w.channel.fileno() >= 0],
            "generation": self.generation,
            "exits": list(self.exits),
            "dead_totals": self.dead_totals,
            "counts": [self.reloads, self.reload_failures, self.upgrades, self.upgrade_failures],
            "last_deploy_error": self.last_deploy_error,
            "started_at": self.started_at,
            "workers_wanted": self.config.workers,
            "signalled_at": self.upgrade_signalled_at,
            "exit_counts": self.exit_counts,
            "listen_baseline": self.listen_baseline,
            "stats_fd": self.stats_server.sock.fileno() if self.stats_server else None,
            "stats_family": self.stats_server.sock.family if self.stats_server else None,
        }

    def restore_state(self, state: dict) -> None:
        self.listeners = [socket.socket(family, socket.SOCK_STREAM, fileno=fd)
                          for fd, family in state["listeners"]]
        for sock in self.listeners:
            os.set_inheritable(sock.fileno(), False)
        for item in state["workers"]:
            channel = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=item["channel"])
            os.set_inheritable(channel.fileno(), False)
            channel.setblocking(False)
            record = WorkerRecord(item["pid"], item["slot"], item["generation"], channel)
            for name in RECORD_FIELDS[3:]:   # the first three went to the constructor
                setattr(record, name, item[name])
            record.reader = ipc.MessageReader(item["pending"])
            self.workers[record.pid] = record
            self.selector.register(channel, selectors.EVENT_READ, record)
        self.generation = state["generation"]
        self.exits.extend(state["exits"])
        self.dead_totals.update(state["dead_totals"])
        self.reloads, self.reload_failures, self.upgrades, self.upgrade_failures = state["counts"]
        self.last_deploy_error = state["last_deploy_error"]
        self.started_at = state["started_at"]
        self.exit_counts = state["exit_counts"]
        self.listen_baseline = state["listen_baseline"]
        self.config.workers = state["workers_wanted"]
        self.ready_notified = True
        self.reap_workers()   # children that died while we were exec'ing

    # -- workers ----------------------------------------------------------------------------

    def manage_workers(self) -> None:
        """Fill every empty slot of the serving and the starting generation (unless it backs
        off), and drain workers beyond the count.

        A draining worker no longer holds its slot: its replacement starts at once, so capacity
        never drops while it finishes its calls.
        """
        now = time.monotonic()
        wanted = [(self.generation, self.config)]
        if self.pending is not None:
            wanted.append((self.pending.generation, self.pending.config))
        keys = set()
        for generation, config in wanted:
            serving = [w for w in self.workers.values()
                       if w.generation == generation and w.state != "draining"]
            for record in serving:
                if record.slot > config.workers:
                    self._retire(record, signal.SIGTERM)
            taken = {w.slot for w in serving}
            for slot in range(1, config.workers + 1):
                keys.add((generation, slot))
                if slot not in taken and self.backoff.may_spawn((generation, slot), now):
                    self.spawn_worker(slot, generation, config)
        self.backoff.retain(keys)

    def spawn_worker(self, slot: int, generation: int, config) -> None:
        master_end, worker_end = socket.socketpair()
        # Our signals wait, blocked, from before fork() until the new worker has its own
        # handlers: one that comes while it boots (a reload right after a respawn) must reach
        # the worker's stop(), not our handler's copy in the child or the default action.
        blocked = self._signal_numbers()
        spec = WorkerSpec(slot=slot, generation=generation, config=config,
                          listeners=self.listeners, channel=worker_end, blocked_signals=blocked)
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        pid = os.fork()
        if pid == 0:
            try:
                self._release_in_child(master_end)
                child_main(spec, self.worker_class)
            finally:
                os._exit(EXIT_CRASH)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        worker_end.close()
        master_end.setblocking(False)
        record = WorkerRecord(pid, slot, generation, master_end)
        self.workers[pid] = record
        self.selector.register(master_end, selectors.EVENT_READ, record)

    def _release_in_child(self, master_end: socket.socket) -> None:
        """In a new worker: drop the master's signal plumbing and every other worker's socket."""
        try:
            signal.set_wakeup_fd(-1)
            for name in self.SIGNALS:
                signal.signal(getattr(signal, f"SIG{name}"), signal.SIG_DFL)
            self.selector.close()
            if self.stats_server is not None:
                self.stats_server.drop_in_child()
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
            try:
                messages = record.reader.feed(data)
            except ipc.IPCError as exc:
                log.error("worker %d (pid %d) sent a corrupt message (%s); draining it",
                          record.slot, record.pid, exc)
                self._forget_channel(record)
                self._retire(record, signal.SIGTERM)
                return
            for message in messages:
                self._on_message(record, message)

    def _forget_channel(self, record: WorkerRecord) -> None:
        if record.channel.fileno() >= 0:
            self.selector.unregister(record.channel)
            record.channel.close()

    def _on_message(self, record: WorkerRecord, message: dict) -> None:
        kind = message.get("t")
        record.last_heartbeat = time.monotonic()
        if kind == "hb":
            record.counters = {key: int(message.get(key, 0))
                               for key in ipc.HEARTBEAT_COUNTERS + ipc.HEARTBEAT_GAUGES}
        elif kind == "ready":
            record.state, record.ready_at = "ready", time.monotonic()
            self._maybe_notify_ready()
        elif kind == "draining":
            record.state, record.stopped_accepting = "draining", True
            record.exit_reason = str(message.get("reason", ""))
        elif kind in ("boot_error", "crash"):
            record.traceback = str(message.get("traceback", ""))

    def _maybe_notify_ready(self) -> None:
        """READY=1 once the first generation has every worker ready (Type=notify start-up)."""
        if self.ready_notified:
            return
        if len(self._ready_slots(self.generation)) >= self.config.workers:
            self.ready_notified = True
            systemd.notify("READY=1", self._status_line())

    def reap_workers(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.upgrade_check is not None and pid == self.upgrade_check[0]:
                self._on_upgrade_check(status)
                continue
            record = self.workers.pop(pid, None)
            if record is not None:
                self._on_worker_exit(record, status)

    def _on_worker_exit(self, record: WorkerRecord, status: int) -> None:
        # A dying worker's last words (its traceback) may still sit in its socket.
        self._read_channel(record)
        self._forget_channel(record)
        for key in ipc.HEARTBEAT_COUNTERS:
            self.dead_totals[key] += record.counters.get(key, 0)
        classification, detail = classify_exit(status, record)
        now = time.monotonic()
        uptime = now - record.started
        entry = {"time": time.time(), "pid": record.pid, "slot": record.slot,
                 "generation": record.generation, "classification": classification,
                 "exit_code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                 "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                 "detail": detail, "uptime": round(uptime, 3), "traceback": record.traceback}
        self.exits.append(entry)
        self.exit_counts[classification] = self.exit_counts.get(classification, 0) + 1
        message = (f"worker {record.slot} (pid {record.pid}, gen {record.generation}) "
                   f"{detail} after {uptime:.1f}s")
        if record.traceback:
            message += f"; its last traceback:\n{record.traceback.rstrip()}"
        if classification in CLEAN_EXITS:
            log.info(message)
        else:
            log.error(message)
        pending = self.pending
        if pending is not None and record.generation == pending.generation and \
                classification == "boot_error":
            self._abandon(f"generation {pending.generation} cannot load the app",
                          record.traceback)
            return
        live = {self.generation, pending.generation if pending else None}
        if self.stopping or record.generation not in live or record.state == "draining":
            return
        key = (record.generation, record.slot)
        delay = self.backoff.record_exit(key, is_early_death(record, classification, now), now)
        failures = self.backoff.failures.get(key, 0)
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

    # -- what operators see -----------------------------------------------------------------

    def _report(self) -> None:
        """Refresh STATUS=, the process title and the watchdog, at a low rate."""
        now = time.monotonic()
        interval = self.watchdog_interval
        if interval is not None and now - self.watchdog_at >= interval:
            self.watchdog_at = now
            systemd.notify("WATCHDOG=1")
        if now - self.status_at >= STATUS_INTERVAL:
            self.status_at = now
            systemd.notify(self._status_line())
            self._title()

    def _status_line(self) -> str:
        current = [w for w in self.workers.values() if w.generation == self.generation]
        older = [w for w in self.workers.values() if w.generation < self.generation]
        ready = sum(w.state == "ready" for w in current)
        text = (f"STATUS=gen {self.generation}: {ready}/{self.config.workers} workers ready, "
                f"{_active_calls(current)} calls")
        if older:
            text += (f"; {len({w.generation for w in older})} older generation(s) draining "
                     f"{_active_calls(older)} calls")
        if self.pending is not None:
            text += f"; generation {self.pending.generation} starting"
        return text

    def _title(self) -> None:
        set_title(f"master [gen {self.generation}] "
                  + " ".join(listeners.describe(sock) for sock in self.listeners))

    def _write_pidfile(self) -> None:
        path = self.config.pidfile
        if path:
            temporary = f"{path}.{os.getpid()}.tmp"
            with open(temporary, "w") as handle:
                handle.write(f"{os.getpid()}\n")
            os.replace(temporary, path)

    def _remove_pidfile(self) -> None:
        path = self.config.pidfile
        try:
            with open(path or "") as handle:
                mine = handle.read().strip() == str(os.getpid())
        except OSError:
            return   # none, or not readable: nothing of ours to remove
        if mine:
            os.unlink(path)


# Exit reasons a worker announces before leaving on purpose (its "draining" message).
CLEAN_EXITS = ("clean", "recycled", "drained", "stopped", "orphaned")
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


def _active_calls(records) -> int:
    """Calls in progress in these workers, as of their last heartbeats."""
    return sum(w.counters.get("active", 0) for w in records)


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass   # already gone; the reaper will record how
