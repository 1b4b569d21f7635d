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
with the new code. A drain (gateway.drain) makes the port refuse connects, once every queued
call is accepted, so FreeSWITCH fails over to the next host; an undrain listens again.
"""

from __future__ import annotations

import ctypes
import faulthandler
import ipaddress
import itertools
import json
import logging
import os
import resource
import selectors
import signal
import socket
import time
import traceback
from collections import deque
from dataclasses import dataclass

from gateway import (__version__, drain, ipc, listeners, privileges, protocol, stats, systemd,
                     upgrade)
from gateway.backoff import RespawnBackoff
from gateway.httpserver import HTTPServer
from gateway.scoreboard import FIELDS, INDEX, CounterBlock
from workers.base import (EXIT_CRASH, WorkerSpec, child_main, describe_wait_status, set_title,
                          signal_name)

log = logging.getLogger("esl_gateway.master")

SPARE = 0   # the slot number of a spare worker: booted, not accepting, waiting for a slot
FORK_SERVER = -1   # the backoff key's slot for a generation's fork server
FORK_DEADLINE = 2.0   # a worker the fork server has not forked by then is forked here instead
FORK_SERVER_CLASS = "workers.forkserver:ForkServer"
LEDGER_BUFFER = 4 * 1024 * 1024   # asked; the kernel caps it at net.core.wmem_max
ORPHAN_WAIT = 10.0   # a call no live worker could take over by then is closed (the dialplan runs)
PR_SET_CHILD_SUBREAPER = 36
LOOP_TICK = 1.0   # at most; the loop wakes sooner for signals, messages and a short --timeout
ABORT_GRACE = 2.0        # SIGABRT (faulthandler dumps the stack) before SIGKILL for a hung worker
QUICK_STOP_SECONDS = 5.0
GRACE_AFTER_GRACEFUL_TIMEOUT = 5.0
STATUS_INTERVAL = 5.0    # how often STATUS= and the process title are refreshed
EXIT_HISTORY = 100
RECORD_FIELDS = ("pid", "slot", "generation", "started", "last_heartbeat", "state", "ready_at",
                 "traceback", "exit_reason", "aborted_at", "stopped_accepting", "farewell",
                 "boot_failed", "app_exit_code", "crash_reported")


class WorkerRecord:
    """The master's view of one worker process."""

    def __init__(self, pid: int | None, slot: int, generation: int, channel: socket.socket,
                 block: CounterBlock, ledger: socket.socket):
        self.pid, self.slot, self.generation, self.channel = pid, slot, generation, channel
        self.block = block   # its counters, in shared memory (gateway.scoreboard)
        self.reader = ipc.MessageReader()
        self.ledger, self.ledger_reader = ledger, ipc.LedgerReader()   # see gateway.ipc
        self.held: dict[int, int] = {}   # our copy of each of its calls' sockets, by call id
        self.started = time.monotonic()
        self.last_heartbeat = self.started
        self.state = "booting"          # booting, ready, draining
        self.ready_at: float | None = None
        self.traceback: str | None = None
        self.exit_reason: str | None = None    # what its "draining" message said it is doing
        self.aborted_at: float | None = None   # when it was found hung and sent SIGABRT
        self.stopped_accepting = False   # it confirmed (its "draining" message) it accepts no more
        # What the worker said about its end; how it ended is classified from these words.
        self.farewell: str | None = None       # its "bye": the reason of a planned exit
        self.boot_failed = False               # it said it cannot load the app
        self.app_exit_code: int | None = None  # it said the app called sys.exit()
        self.crash_reported = False            # it sent the traceback that is ending it
        self.proxy: dict | None = None   # proxy mode: its backends' figures, last heartbeat
        self.retire_signal: int | None = None   # the stop signal it was sent (or is due)

    @property
    def counters(self) -> dict[str, int]:
        return self.block.read()

    @property
    def name(self) -> str:
        """How logs name it: ``worker 2``, or ``spare worker`` until it is given a slot."""
        return f"worker {self.slot}" if self.slot != SPARE else "spare worker"


@dataclass
class Orphan:
    """A call whose worker is gone (or had to close), waiting for a live worker to take it."""

    fd: int        # our copy of its socket: FreeSWITCH's side of the call is still up
    origin: str    # what became of its worker, for the log line of the worker that resumes it
    since: float


@dataclass
class ForkServerRecord:
    """A generation's fork server (workers.forkserver): forks that generation's workers."""

    pid: int
    generation: int
    channel: socket.socket   # SOCK_SEQPACKET: one request or answer per message
    ready: bool = False
    retired: bool = False    # its generation no longer needs it; it was told to go


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
    # Each signal's handle_<name>; the drain's two have no name of their own (real-time ones).
    HANDLERS = {**{getattr(signal, f"SIG{name}"): name.lower() for name in SIGNALS},
                drain.DRAIN_SIGNAL: "drain", drain.UNDRAIN_SIGNAL: "undrain"}
    # Deploy, scaling and drain signals are ours alone, yet `systemctl kill -s USR2 esl-gateway`
    # sends one to every process of the unit, and again to each process that appears while
    # systemd goes round (the upgrade's check, a new fork server): our children ignore them,
    # from fork() on and across the check's exec. TERM, INT and QUIT keep their default action
    # until a worker installs its own handlers.
    IGNORED_BY_CHILDREN = frozenset(HANDLERS) - {signal.SIGCHLD, signal.SIGINT, signal.SIGQUIT,
                                                 signal.SIGTERM}

    def __init__(self, config, worker_class: str, argv: list[str], load_config):
        self.config = config              # the serving generation's; a pending one has its own
        self.worker_class = worker_class
        self.argv = argv                  # our command line, for the upgrade's exec
        self.load_config = load_config    # re-reads the config file (and environment) on reload
        self.workers: dict[int, WorkerRecord] = {}
        self.forking: list[WorkerRecord] = []   # asked of a fork server, pid not known yet
        self.forkservers: dict[int, ForkServerRecord] = {}   # by generation
        self.orphans: list[Orphan] = []
        self.calls_orphaned = 0   # calls taken from a dead (or closing) worker to resume them
        self.calls_lost = 0   # calls a worker's death ended: unprotected, or no worker took them
        self.resume_ids = itertools.count(-1, -1)   # ids we give resumed calls (workers' > 0)
        self.ledgers_read_at = 0.0
        # Registered with the selector once a read of the ledgers found nothing: see _read_ledgers.
        self.ledgers_watched = False
        self.watched_ledgers: list[socket.socket] = []
        self.ledger_stirred = False   # a watched ledger became readable
        self.generation = 1
        self.pending: PendingReload | None = None
        self.drain: drain.Drain | None = None   # drained or draining: see gateway.drain
        self.switchover: Switchover | None = None
        self.upgrade_check: tuple[int, int] | None = None   # (check pid, state fd)
        self.upgrade_signalled_at = 0.0
        self.exits: deque[dict] = deque(maxlen=EXIT_HISTORY)
        self.exit_counts: dict[str, int] = {}   # by classification, never trimmed
        # The counters of workers that are gone.
        self.dead_totals = dict.fromkeys(FIELDS, 0)
        self.dead_backends: dict[str, dict] = {}   # proxy mode: dead workers' backend counts
        self.dead_gave_up = 0
        self.oom_kills = stats.oom_kills()   # the kernel's count, to tell OOM kills from others
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
        # systemd's watchdog (WatchdogSec=) sends SIGABRT to a master that stops pinging: its
        # stack then reaches stderr (journald), showing where it was stuck.
        faulthandler.enable()
        # Workers forked by a fork server are its grandchildren: they become ours once their
        # parent (the fork server's helper) exits, so we reap them and see how they ended.
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
        # We hold a copy of every call's socket: as many descriptors as we may.
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        if state is None:
            self.listeners = self._open_listeners()
        else:
            self.restore_state(state)
        for sock in self.listeners:
            log.info("Listening at: %s (pid %d)", listeners.describe(sock), os.getpid())
        self._open_stats(state)
        self._init_signals()
        self._write_pidfile()
        # Everything that needs root is done (sockets bound, pidfile written): drop it before
        # any worker exists (gateway.privileges says what the master keeps).
        privileges.drop(self.config.user, self.config.group,
                        [self.config.pidfile] if self.config.pidfile else [])
        if not protocol.ACCELERATED:
            log.warning("gateway/_framer.c was not compiled where esl-gateway was installed (no "
                        "C compiler?): sessions parse in pure Python, correct but slower")
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
            try:
                if self._turn():
                    break
            except Exception:   # a bug here must not take the port down with the master
                log.exception("internal error in the master's loop; carrying on")
                time.sleep(0.1)   # not a hot loop if it repeats: the log says it does
        if self.stats_server is not None:
            self.stats_server.close()
        for sock in self.listeners:
            sock.close()
        self._remove_pidfile()
        log.info("master %d stopped", os.getpid())
        return 0

    def _turn(self) -> bool:
        """One pass of the loop: wait, handle signals and messages, supervise. True when the
        master is stopping and every child is gone."""
        if not self.stopping:
            self.manage_workers()
        next_spawn = self.backoff.next_spawn_in(time.monotonic())
        emptying = self.drain is not None and not self.drain.refusing
        self._wait(min(self.tick, LOOP_TICK if self.ledgers_watched else ipc.LEDGER_POLL,
                       drain.POLL if emptying else LOOP_TICK,
                       LOOP_TICK if next_spawn is None else next_spawn))
        while self.signal_queue:
            getattr(self, f"handle_{self.HANDLERS[self.signal_queue.popleft()]}")()
        self._adopt_forked()
        self._read_ledgers()
        if self.drain is not None and not self.stopping:   # stopping workers accept no more
            self.drain.advance()
        if self.stopping:
            if not (self.workers or self.forking or self.forkservers):
                return True
            if time.monotonic() > self.stop_deadline:
                log.warning("%d worker(s) still running at the stop deadline; killing them",
                            len(self.workers))
                self._signal_workers(signal.SIGKILL)
                self.stop_deadline = float("inf")
        else:
            self.murder_workers()
            self.advance_reload()
        self._report()
        return False

    def _open_listeners(self) -> list[socket.socket]:
        """Sockets from systemd (socket activation or our own fd store), else bound here."""
        inherited = systemd.listen_fds()
        if inherited:
            log.info("using %d listening socket(s) passed by systemd (%s); --bind is not used",
                     len(inherited), ", ".join(name or "unnamed" for _, name in inherited))
            for sock, _ in inherited:
                listeners.tune(sock)
                sock.setblocking(False)
                drain.listen_again(sock, self.config.backlog)
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
        token = stats_token(self.config)
        self.stats_server = HTTPServer(sock, self.selector, routes, token)
        log.info("Stats at: http://%s/stats (also /metrics, /healthz)", listeners.describe(sock))
        if token is None and not ipaddress.ip_address(sock.getsockname()[0]).is_loopback:
            log.warning("the stats endpoint listens beyond loopback without a token: whoever "
                        "reaches %s reads the gateway's state (set --stats-token-file)",
                        listeners.describe(sock))

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
        for signum in self.HANDLERS:
            signal.signal(signum, self._queue_signal)
        # An upgrade execs us with these blocked so none is lost (or kills us) meanwhile.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self._signal_numbers())

    def _signal_numbers(self) -> set[int]:
        return set(self.HANDLERS)

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
            elif isinstance(key.data, ForkServerRecord):
                self._read_forkserver(key.data)
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

    def handle_drain(self) -> None:
        if self.drain is not None:
            log.info("drain: already draining (%s)", self.drain.state)
            return
        self.drain = drain.Drain(self.listeners)

    def handle_undrain(self) -> None:
        if self.drain is None:
            log.info("undrain: not drained; nothing to do")
            return
        self.drain.end()
        self.drain = None
        # Workers stopped watching the listener when it was shut down; those being forked too.
        for record in self._all_workers():
            if record.channel.fileno() < 0:
                continue   # it is gone: the reaper sees it
            try:
                record.channel.send(ipc.pack("listening"))
            except OSError as exc:   # a full channel: it would never accept again
                log.warning("%s (pid %s) cannot be told to accept again (%s); retiring it, its "
                            "replacement accepts", record.name, record.pid, exc)
                self._retire(record, signal.SIGTERM)

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
        for server in self.forkservers.values():
            self._retire_forkserver(server)

    # -- reload: a new generation of workers ------------------------------------------------

    def reload(self) -> None:
        """Re-read the config and start a new generation with fresh app code (HUP)."""
        if self.stopping:
            return
        signalled_at = time.monotonic()
        systemd.notify("RELOADING=1", systemd.monotonic_usec())
        try:
            config = self.load_config()
            token = stats_token(config)
        except Exception as exc:   # a bad config file must not take the master down
            self._deploy_failed("reload", f"the config cannot be used: {exc}")
            return
        for name, what in (("bind", "listening sockets are kept as they are"),
                           ("user", "the master dropped root and cannot switch again"),
                           ("group", "the master dropped root and cannot switch again")):
            if getattr(config, name) != getattr(self.config, name):
                log.warning("reload: %s changed (%s); %s, a restart applies it", name,
                            getattr(config, name), what)
                setattr(config, name, getattr(self.config, name))
        if self.stats_server is not None:
            self.stats_server.token = token
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
        for record in self._all_workers():
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
        if self.pending is None and not self.stopping:   # else READY=1 comes with the pending one
            systemd.notify("READY=1", self._status_line())

    def _retire_generation(self, generation: int, signum: int) -> None:
        for record in self._all_workers():
            if record.generation == generation:
                self._retire(record, signum)

    def _retire(self, record: WorkerRecord, signum: int) -> None:
        """Take a worker out of service: SIGTERM drains its calls, SIGQUIT closes them. One
        still being forked gets the signal once its pid is known."""
        record.state = "draining"
        record.retire_signal = signum
        if record.pid is not None:
            _kill(record.pid, signum)

    def _all_workers(self) -> list[WorkerRecord]:
        """Every worker, those a fork server is still forking included."""
        return [*self.workers.values(), *self.forking]

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
            self._deploy_failed("upgrade", f"refused while generation {self.pending.generation} "
                                "is starting; send USR2 again once it is ready")
            return
        self.upgrade_signalled_at = time.monotonic()
        state_fd = upgrade.write_state(self.export_state())
        pid = upgrade.start_check(self.argv, state_fd, self.IGNORED_BY_CHILDREN)
        self.upgrade_check = (pid, state_fd)
        log.info("upgrade: checking that the new image starts (pid %d)", pid)

    def _on_upgrade_check(self, status: int) -> None:
        _, state_fd = self.upgrade_check
        self.upgrade_check = None
        os.close(state_fd)
        if status != 0:
            self._deploy_failed("upgrade", f"the new image failed its start-up check (it "
                                f"{describe_wait_status(status)}; its output is above); this "
                                "master keeps running the old code")
            return
        if self.stopping or self.pending is not None:
            self._deploy_failed("upgrade", "not carried out: the master is stopping or a reload "
                                "started during the check")
            return
        systemd.notify("RELOADING=1", systemd.monotonic_usec())
        # Fork servers hold the old code: the new image starts its own. Workers being forked
        # right now are adopted first, so they are handed over with the others.
        for server in self.forkservers.values():
            self._retire_forkserver(server)
        self._adopt_forked()
        state_fd = upgrade.write_state(self.export_state())
        keep = [sock.fileno() for sock in self.listeners] + [o.fd for o in self.orphans]
        for record in self.workers.values():
            keep += [record.block.fd, *record.held.values(), *record.ledger_reader.fds]
            keep += [sock.fileno() for sock in (record.channel, record.ledger)
                     if sock.fileno() >= 0]
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
                             channel=w.channel.fileno(), pending=bytes(w.reader.pending),
                             counters=w.block.fd, ledger=w.ledger.fileno(), held=w.held,
                             ledger_pending=[bytes(w.ledger_reader.pending),
                                             w.ledger_reader.fds])
                        for w in self.workers.values()],
            "orphans": [[o.fd, o.origin, o.since] for o in self.orphans],
            "calls_orphaned": self.calls_orphaned, "calls_lost": self.calls_lost,
            "next_resume_id": next(self.resume_ids),
            "backoff": self.backoff.export(),
            "oom_kills": self.oom_kills,
            "generation": self.generation,
            "exits": list(self.exits),
            "dead_totals": self.dead_totals,
            "dead_backends": self.dead_backends, "dead_gave_up": self.dead_gave_up,
            "counts": [self.reloads, self.reload_failures, self.upgrades, self.upgrade_failures],
            "last_deploy_error": self.last_deploy_error,
            "started_at": self.started_at,
            "workers_wanted": self.config.workers,
            "signalled_at": self.upgrade_signalled_at,
            "exit_counts": self.exit_counts,
            "listen_baseline": self.listen_baseline,
            "drain": self.drain.export() if self.drain else None,
            "stats_fd": self.stats_server.sock.fileno() if self.stats_server else None,
            "stats_family": self.stats_server.sock.family if self.stats_server else None,
        }

    def restore_state(self, state: dict) -> None:
        self.listeners = [socket.socket(family, socket.SOCK_STREAM, fileno=fd)
                          for fd, family in state["listeners"]]
        for sock in self.listeners:
            os.set_inheritable(sock.fileno(), False)
        for item in state["workers"]:
            for fd in [item["counters"], *item["held"].values(), *item["ledger_pending"][1]]:
                os.set_inheritable(fd, False)
            channel, ledger = _inherited_socket(item["channel"]), _inherited_socket(item["ledger"])
            record = WorkerRecord(item["pid"], item["slot"], item["generation"], channel,
                                  CounterBlock(item["counters"]), ledger)
            for name in RECORD_FIELDS[3:]:   # the first three went to the constructor
                setattr(record, name, item[name])
            record.reader = ipc.MessageReader(item["pending"])
            record.ledger_reader = ipc.LedgerReader(*item["ledger_pending"])
            record.held = item["held"]
            self.workers[record.pid] = record
            if channel.fileno() >= 0:
                self.selector.register(channel, selectors.EVENT_READ, record)
        for fd, origin, since in state["orphans"]:
            os.set_inheritable(fd, False)
            self.orphans.append(Orphan(fd, origin, since))
        self.calls_orphaned, self.calls_lost = state["calls_orphaned"], state["calls_lost"]
        self.resume_ids = itertools.count(state["next_resume_id"], -1)
        self.backoff.restore(state["backoff"])
        self.oom_kills = state["oom_kills"]
        self.generation = state["generation"]
        self.exits.extend(state["exits"])
        self.dead_totals.update(state["dead_totals"])
        self.dead_backends, self.dead_gave_up = state["dead_backends"], state["dead_gave_up"]
        self.reloads, self.reload_failures, self.upgrades, self.upgrade_failures = state["counts"]
        self.last_deploy_error = state["last_deploy_error"]
        self.started_at = state["started_at"]
        self.exit_counts = state["exit_counts"]
        self.listen_baseline = state["listen_baseline"]
        if state["drain"] is not None:
            self.drain = drain.Drain(self.listeners, *state["drain"])
        self.config.workers = state["workers_wanted"]
        self.ready_notified = True
        self.reap_workers()   # children that died while we were exec'ing

    # -- workers ----------------------------------------------------------------------------

    def manage_workers(self) -> None:
        """Fill every empty slot of the serving and the starting generation (unless it backs
        off), keep each generation's spares booted, and drain workers beyond the count.

        An empty slot takes a booted spare if there is one (it accepts within milliseconds),
        else a fresh worker. A draining worker no longer holds its slot: its replacement starts
        at once, so capacity never drops while it finishes its calls.
        """
        now = time.monotonic()
        wanted = [(self.generation, self.config)]
        if self.pending is not None:
            wanted.append((self.pending.generation, self.pending.config))
        keys = set()
        for generation, config in wanted:
            serving = [w for w in self._all_workers()
                       if w.generation == generation and w.state != "draining"]
            spares = [w for w in serving if w.slot == SPARE]
            for record in serving:
                if record.slot > config.workers:
                    self._retire(record, signal.SIGTERM)
            taken = {w.slot for w in serving}
            for slot in range(1, config.workers + 1):
                keys.add((generation, slot))
                if slot in taken or not self.backoff.may_spawn((generation, slot), now):
                    continue
                booted = [w for w in spares if w.state == "spare"]
                if booted:
                    self._give_slot(booted[0], slot)
                    spares.remove(booted[0])
                else:
                    self.spawn_worker(slot, generation, config)
            keys.add((generation, SPARE))
            for record in spares[config.spare_workers:]:
                self._retire(record, signal.SIGTERM)
            for _ in range(config.spare_workers - len(spares)):
                if self.backoff.may_spawn((generation, SPARE), now):
                    self.spawn_worker(SPARE, generation, config)
            keys.add((generation, FORK_SERVER))
            if generation not in self.forkservers and \
                    self.backoff.may_spawn((generation, FORK_SERVER), now):
                self._spawn_forkserver(generation, config)
        for generation, server in self.forkservers.items():
            if generation not in (g for g, _ in wanted):
                self._retire_forkserver(server)
        self.backoff.retain(keys)

    def _give_slot(self, spare: WorkerRecord, slot: int) -> None:
        """A booted spare takes an empty slot: one message, and it accepts."""
        try:
            spare.channel.send(ipc.pack("serve", slot=slot))
        except OSError:
            return   # it is dying; the reaper will see it, the slot is filled next turn
        spare.slot, spare.state = slot, "booting"   # until its "ready"
        log.info("spare worker (pid %d, gen %d) takes slot %d", spare.pid, spare.generation,
                 slot)

    def spawn_worker(self, slot: int, generation: int, config) -> None:
        """Start a worker for ``slot``: forked by the generation's fork server if it is up (a
        few milliseconds), else here (it then imports gevent and patches itself first)."""
        master_end, worker_end = socket.socketpair()
        ledger, worker_ledger = socket.socketpair()
        # Room for the records of several read intervals (each passed socket costs about 1 KiB
        # of buffer): a full ledger would leave calls unprotected.
        worker_ledger.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, LEDGER_BUFFER)
        block = CounterBlock()
        master_end.setblocking(False)
        ledger.setblocking(False)
        server = self.forkservers.get(generation)
        pid = None
        if server is None or not server.ready or server.retired or \
                not self._ask_fork(server, slot, [worker_end.fileno(), block.fd,
                                                  worker_ledger.fileno()]):
            spec = WorkerSpec(slot=slot, generation=generation, config=config,
                              listeners=self.listeners, channel=worker_end, counters=block,
                              ledger=worker_ledger, blocked_signals=self._signal_numbers())
            pid = self._fork_child(spec, self.worker_class, [master_end, ledger])
        worker_end.close()
        worker_ledger.close()
        record = WorkerRecord(pid, slot, generation, master_end, block, ledger)
        # Its ledger is not watched yet: the clock times the next read, which watches them all.
        self._watch_ledgers(False)
        if pid is None:
            self.forking.append(record)
        else:
            self.workers[pid] = record
        self.selector.register(master_end, selectors.EVENT_READ, record)

    def _ask_fork(self, server: ForkServerRecord, slot: int, fds: list[int]) -> bool:
        """Ask the fork server for a worker; ``fds``: its channel, counters and ledger."""
        try:
            socket.send_fds(server.channel, [ipc.pack("fork", slot=slot,
                                                      worker_class=self.worker_class)], fds)
        except OSError as exc:   # it is dying, or stuck with a full socket
            log.warning("fork server of generation %d (pid %d) cannot take a request (%s); "
                        "forking the worker here", server.generation, server.pid, exc)
            return False
        return True

    def _fork_child(self, spec: WorkerSpec, class_path: str, ours: list) -> int:
        """fork() a worker or a fork server running ``class_path``; returns its pid. ``ours``:
        the master's ends of the new child's sockets, closed in the child."""
        # Our signals wait, blocked, from before fork() until the child has its own handlers:
        # one that comes while it boots (a reload right after a respawn) must reach the
        # worker's stop(), not our handler's copy in the child or the default action.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, spec.blocked_signals)
        pid = os.fork()
        if pid == 0:
            try:
                self._release_in_child(ours)
                child_main(spec, class_path)
            finally:
                os._exit(EXIT_CRASH)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        return pid

    def _spawn_forkserver(self, generation: int, config) -> None:
        master_end, server_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        spec = WorkerSpec(slot=FORK_SERVER, generation=generation, config=config,
                          listeners=self.listeners, channel=server_end, counters=None,
                          ledger=None, blocked_signals=self._signal_numbers())
        pid = self._fork_child(spec, FORK_SERVER_CLASS, [master_end])
        server_end.close()
        master_end.setblocking(False)
        server = self.forkservers[generation] = ForkServerRecord(pid, generation, master_end)
        self.selector.register(master_end, selectors.EVENT_READ, server)

    def _read_forkserver(self, server: ForkServerRecord) -> None:
        try:
            data = server.channel.recv(ipc.MAX_MESSAGE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.selector.unregister(server.channel)
            server.channel.close()
            return
        for message in ipc.MessageReader().feed(data):
            if message.get("t") == "ready":
                server.ready = True
            elif message.get("t") == "boot_error":
                log.error("the fork server of generation %d cannot start; workers are forked "
                          "by the master meanwhile:\n%s", server.generation,
                          str(message.get("traceback", "")).rstrip())

    def _retire_forkserver(self, server: ForkServerRecord) -> None:
        if not server.retired:
            server.retired = True
            _kill(server.pid, signal.SIGTERM)

    def _adopt_forked(self) -> None:
        """Workers forked by a fork server: learn their pids (its helper writes each into the
        worker's counters before it exits, so before the worker can be reaped here); fork here
        what a fork server failed to fork in time."""
        now = time.monotonic()
        for record in list(self.forking):
            pid = record.block.values[INDEX["pid"]]
            if pid:
                self.forking.remove(record)
                record.pid = pid
                self.workers[pid] = record
                if record.retire_signal is not None:   # retired, or stopped, while forked
                    _kill(pid, record.retire_signal)
            elif now - record.started > FORK_DEADLINE:
                self.forking.remove(record)
                self._forget_channel(record)
                self._close_ledger(record)
                record.block.close()
                server = self.forkservers.get(record.generation)
                log.error("the fork server of generation %d did not fork worker %d within "
                          "%.0fs; killing it (workers are forked here until it is back)",
                          record.generation, record.slot, FORK_DEADLINE)
                if server is not None:
                    server.ready = False
                    _kill(server.pid, signal.SIGKILL)

    def _release_in_child(self, ours: list) -> None:
        """In a new worker: drop the master's signal plumbing, every other worker's sockets,
        and every call socket the master holds (a copy left open here would keep such a call's
        connection up after its own worker closed it)."""
        try:
            signal.set_wakeup_fd(-1)
            for signum in self.HANDLERS:
                signal.signal(signum, signal.SIG_IGN if signum in self.IGNORED_BY_CHILDREN else
                              signal.SIG_DFL)
            self.selector.close()
            if self.stats_server is not None:
                self.stats_server.drop_in_child()
            os.close(self.pipe_r)
            os.close(self.pipe_w)
            for record in [*self.workers.values(), *self.forking]:
                record.channel.close()
                record.block.close()
                record.ledger.close()
                for fd in record.held.values():
                    os.close(fd)
            for orphan in self.orphans:
                os.close(orphan.fd)
            for server in self.forkservers.values():
                server.channel.close()
            for end in ours:
                end.close()
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
                log.error("%s (pid %s) sent a corrupt message (%s); draining it",
                          record.name, record.pid, exc)
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
        if kind == "hb" and "proxy" in message:
            record.proxy = message["proxy"]
        elif kind == "ready":
            record.state, record.ready_at = "ready", time.monotonic()
            self._maybe_notify_ready()
        elif kind == "spare" and record.state == "booting":
            record.state = "spare"
        elif kind in ("draining", "bye"):
            reason = str(message.get("reason", ""))
            if record.state != "draining":   # it leaves service: its replacement starts now
                self._vacated(record, reason == "app_exit", "the app called sys.exit()")
            record.state, record.stopped_accepting = "draining", True
            record.exit_reason = reason
            if kind == "bye":
                record.farewell = reason
        elif kind in ("boot_error", "crash", "app_exit"):
            record.traceback = str(message.get("traceback", ""))
            record.boot_failed = record.boot_failed or kind == "boot_error"
            record.crash_reported = record.crash_reported or kind == "crash"
            if kind == "app_exit":
                record.app_exit_code = int(message.get("code", 0))

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
            server = next((s for s in self.forkservers.values() if s.pid == pid), None)
            if server is not None:
                self._on_forkserver_exit(server, status)
                continue
            if pid not in self.workers:
                self._adopt_forked()
            record = self.workers.pop(pid, None)
            if record is not None:
                self._on_worker_exit(record, status)

    def _on_forkserver_exit(self, server: ForkServerRecord, status: int) -> None:
        del self.forkservers[server.generation]
        if server.channel.fileno() >= 0:
            self.selector.unregister(server.channel)
            server.channel.close()
        if server.retired:
            return
        log.error("the fork server of generation %d (pid %d) %s; starting another",
                  server.generation, server.pid, describe_wait_status(status))
        self.backoff.vacated((server.generation, FORK_SERVER), app_fault=True,
                             served=server.ready, now=time.monotonic(), detail="fork server")

    def _read_ledgers(self) -> None:
        """Learn which calls each worker opened and closed (gateway.ipc), and give orphaned
        calls to live workers: every LEDGER_POLL while calls come and go or orphans wait.

        A read that finds nothing (and leaves no orphan) has the ledgers watched instead: an
        idle master then sleeps for LOOP_TICK, not LEDGER_POLL, and the first record to arrive
        wakes it and is read at once. A read that finds records is followed by the next one
        LEDGER_POLL later, so a loaded master reads as often as before (about ten times a
        second) and never once per call, and no record waits longer than it did.
        """
        now = time.monotonic()
        if not (self.ledger_stirred if self.ledgers_watched else
                now - self.ledgers_read_at >= ipc.LEDGER_POLL):
            return
        self.ledgers_read_at, self.ledger_stirred = now, False
        found = [self._read_ledger(record) for record in self._all_workers()]
        if self.orphans:
            self._place_orphans(now)
        self._watch_ledgers(not any(found) and not self.orphans)

    def _watch_ledgers(self, watch: bool) -> None:
        """Have every open ledger wake the master when it becomes readable, or none."""
        if watch == self.ledgers_watched:
            return
        self.ledgers_watched = watch
        if watch:
            self.watched_ledgers = [record.ledger for record in self._all_workers()
                                    if record.ledger.fileno() >= 0]
            for ledger in self.watched_ledgers:
                self.selector.register(ledger, selectors.EVENT_READ, self._on_ledger_readable)
        else:
            for ledger in self.watched_ledgers:
                self.selector.unregister(ledger)
            self.watched_ledgers = []

    def _on_ledger_readable(self, _mask: int) -> None:
        self.ledger_stirred = True

    def _close_ledger(self, record: WorkerRecord) -> None:
        """Close a worker's ledger, which the selector must let go of first."""
        if record.ledger in self.watched_ledgers:
            self.selector.unregister(record.ledger)
            self.watched_ledgers.remove(record.ledger)
        record.ledger.close()

    def _read_ledger(self, record: WorkerRecord) -> bool:
        """Take in what the worker's ledger holds; True if it held anything."""
        found = False
        while record.ledger.fileno() >= 0:
            try:
                data, fds, flags, _ = socket.recv_fds(record.ledger, 65536, 256,
                                                      socket.MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                return found
            except OSError:
                data, fds, flags = b"", [], 0
            if flags & socket.MSG_CTRUNC:
                log.error("%s (pid %s) passed more call sockets than we may hold (RLIMIT_NOFILE)"
                          "; those calls will not survive its death", record.name, record.pid)
            if not data:
                self._close_ledger(record)
                return found
            found = True
            try:
                records = record.ledger_reader.feed(data, fds)
            except ipc.IPCError as exc:
                log.error("%s (pid %s) wrote a corrupt call ledger (%s); its calls will not "
                          "survive its death", record.name, record.pid, exc)
                self._close_ledger(record)
                return found
            held = record.held
            for kind, call_id, fd in records:
                if kind == ipc.OPENED:
                    held[call_id] = fd
                else:
                    fd = held.pop(call_id, None)
                    if fd is not None:
                        os.close(fd)
        return found

    def _orphan(self, record: WorkerRecord, origin: str) -> None:
        """The worker is gone: each call it still held waits for a live worker."""
        self._close_ledger(record)
        held, record.held = record.held, {}
        if not held:
            return
        if self.stopping:
            for fd in held.values():
                os.close(fd)
            self.calls_lost += len(held)
            log.warning("%d call(s) of %s closed: the master is stopping", len(held),
                        record.name)
            return
        now = time.monotonic()
        self.calls_orphaned += len(held)
        self.orphans += [Orphan(fd, origin, now) for fd in held.values()]
        self._place_orphans(now)

    def _place_orphans(self, now: float) -> None:
        """Give each orphan to the least busy ready worker of the serving generation; close
        those that waited ORPHAN_WAIT for one (FreeSWITCH's dialplan then goes on)."""
        targets = {w: w.counters["active"] for w in self.workers.values()
                   if w.generation == self.generation and w.state == "ready"
                   and w.channel.fileno() >= 0}
        for orphan in list(self.orphans):
            if targets:
                target = min(targets, key=targets.get)
                call_id = next(self.resume_ids)
                try:
                    socket.send_fds(target.channel, [ipc.pack("resume", id=call_id,
                                                              origin=orphan.origin)],
                                    [orphan.fd])
                except OSError:
                    del targets[target]   # dying, or not reading: the next turn tries another
                    continue
                target.held[call_id] = orphan.fd   # still ours too: it may die as well
                targets[target] += 1
                self.orphans.remove(orphan)
            elif now - orphan.since > ORPHAN_WAIT:
                os.close(orphan.fd)
                self.orphans.remove(orphan)
                self.calls_lost += 1
                log.error("an orphaned call (%s) found no live worker within %.0fs; closed, so "
                          "FreeSWITCH's dialplan goes on", orphan.origin, ORPHAN_WAIT)

    def _on_worker_exit(self, record: WorkerRecord, status: int) -> None:
        # A dying worker's last words (its traceback) may still sit in its socket, and the last
        # calls it opened in its ledger: what it sent before dying is all there.
        self._read_channel(record)
        self._forget_channel(record)
        self._read_ledger(record)
        counters = record.counters   # exact: the worker wrote them to shared memory
        record.block.close()
        for key in FIELDS:
            self.dead_totals[key] += counters[key]
        self.dead_gave_up += (record.proxy or {}).get("gave_up", 0)
        for address, figures in (record.proxy or {}).get("backends", {}).items():
            totals = self.dead_backends.setdefault(address, {})
            for key in ipc.BACKEND_COUNTERS:
                totals[key] = totals.get(key, 0) + figures.get(key, 0)
        classification, detail = self.classify_exit(status, record)
        now = time.monotonic()
        uptime = now - record.started
        entry = {"time": time.time(), "pid": record.pid, "slot": record.slot,
                 "generation": record.generation, "classification": classification,
                 "exit_code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                 "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                 "detail": detail, "uptime": round(uptime, 3), "traceback": record.traceback}
        self.exits.append(entry)
        self.exit_counts[classification] = self.exit_counts.get(classification, 0) + 1
        key = (record.generation, record.slot)
        self.backoff.ended(key, death=classification not in CLEAN_EXITS,
                           completed=counters["completed"], now=now)
        # Calls in progress of which we hold no copy (survival off, or not passed in time).
        unprotected = max(counters["active"] - len(record.held), 0)
        self.calls_lost += unprotected
        message = (f"{record.name} (pid {record.pid}, gen {record.generation}) "
                   f"{detail} after {uptime:.1f}s, {counters['completed']} call(s) completed")
        if record.held:
            message += f", {len(record.held)} in progress handed to live workers"
        if unprotected:
            message += f", {unprotected} in progress lost"
        if record.traceback:
            message += f"; its last traceback:\n{record.traceback.rstrip()}"
        if classification in CLEAN_EXITS:
            log.info(message)
        else:
            log.error(message)
        self._orphan(record, f"{record.name} (pid {record.pid}, gen {record.generation}) "
                             f"{detail}")
        pending = self.pending
        if pending is not None and record.generation == pending.generation and \
                classification == "boot_error":
            self._abandon(f"generation {pending.generation} cannot load the app",
                          record.traceback)
            return
        if record.state != "draining":
            self._vacated(record, classification in APP_FAULTS, detail, counters)

    def _vacated(self, record: WorkerRecord, app_fault: bool, detail: str,
                 counters: dict | None = None) -> None:
        """A worker of a live generation leaves service: may its slot be refilled at once?
        ``counters``: its last ones, once its shared page is closed."""
        pending = self.pending
        if self.stopping or record.generation not in (
                self.generation, pending.generation if pending else None):
            return
        if counters is None:
            counters = record.counters
        served = counters["served"]
        sibling_serves = counters["calls"] > 0 and any(
            w.counters["served"] for w in self.workers.values()
            if w.generation == record.generation and w.pid != record.pid and w.state == "ready")
        key = (record.generation, record.slot)
        delay = self.backoff.vacated(key, app_fault=app_fault, served=bool(served),
                                     now=time.monotonic(), detail=detail,
                                     sibling_serves=sibling_serves)
        in_a_row = self.backoff.in_loop(key)
        if app_fault and in_a_row > 1:
            log.error("%s of generation %d is crash-looping: %d workers in a row ended before "
                      "completing a call (the last %s); next attempt in %.1fs (the port stays "
                      "bound, other slots keep serving)",
                      f"slot {record.slot}" if record.slot != SPARE else "the spare slot",
                      record.generation, in_a_row, detail, delay)

    def classify_exit(self, status: int, record: WorkerRecord) -> tuple[str, str]:
        """(classification, human detail) for a reaped worker, from what it said before it
        went and from its wait status; never from its exit code alone, which the app chooses."""
        if os.WIFSIGNALED(status):
            signum = os.WTERMSIG(status)
            name = signal_name(signum)
            if record.aborted_at is not None:
                return "killed_as_hung", f"was killed as hung ({name})"
            if signum == signal.SIGKILL:
                oom_kills, self.oom_kills = self.oom_kills, stats.oom_kills()
                if self.oom_kills is not None and oom_kills is not None and \
                        self.oom_kills > oom_kills:
                    return "oom_killed", ("was killed by SIGKILL while the kernel's OOM killer "
                                          "ran (oom_kill in /proc/vmstat rose): out of memory")
            if signum in EXTERNAL_SIGNALS:
                return "killed", describe_wait_status(status)
            return "crashed", f"crashed with signal {signum} ({name})"
        code = os.WEXITSTATUS(status)
        if record.farewell == "app_exit" or (record.app_exit_code == code and
                                             record.farewell is None):
            return "app_exit", f"exited with code {code}: the app called sys.exit()"
        if record.farewell in CLEAN_EXITS and code == 0:
            return record.farewell, f"exited cleanly ({record.farewell})"
        if record.boot_failed:
            return "boot_error", f"could not load the app (exit {code})"
        if record.crash_reported:
            return "crashed", f"crashed (exit {code}) with the traceback below"
        return "crashed", (f"exited with code {code} without a word from the worker: the app "
                           "(os._exit) or a native library ended the process")

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
                log.error("%s (pid %d) sent no heartbeat for %.1fs (timeout %.0fs): its "
                          "event loop is blocked; aborting it (its stack follows on stderr)",
                          record.name, record.pid, silent, timeout)
                record.aborted_at = now
                _kill(record.pid, signal.SIGABRT)
            elif record.aborted_at is not None and now - record.aborted_at > ABORT_GRACE:
                _kill(record.pid, signal.SIGKILL)

    def _signal_workers(self, signum: int) -> None:
        for record in self._all_workers():
            record.retire_signal = signum
            if record.pid is not None:
                _kill(record.pid, signum)

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
        if path and _read_pid(path) != os.getpid():   # an upgraded master's is still right
            temporary = f"{path}.{os.getpid()}.tmp"
            with open(temporary, "w") as handle:
                handle.write(f"{os.getpid()}\n")
            os.replace(temporary, path)

    def _remove_pidfile(self) -> None:
        path = self.config.pidfile
        if path and _read_pid(path) == os.getpid():
            try:
                os.unlink(path)
            except OSError as exc:   # e.g. its directory is not the --user's to write
                log.warning("cannot remove the pidfile %s: %s", path, exc)


# Exit reasons a worker announces before leaving on purpose (its "bye" message).
CLEAN_EXITS = ("clean", "recycled", "drained", "stopped", "orphaned")
# Exits that are the app's doing: these decide a crash loop (gateway.backoff).
APP_FAULTS = ("crashed", "app_exit", "boot_error", "oom_killed", "killed_as_hung")
# Signals that come from outside (an operator, the OOM killer, us), not from a bug in the worker.
EXTERNAL_SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


def _read_pid(path: str) -> int | None:
    """The PID in a pidfile, or None (none, unreadable, not a PID)."""
    try:
        with open(path) as handle:
            return int(handle.read().strip())
    except (OSError, ValueError):
        return None


def stats_token(config) -> str | None:
    """The stats endpoint's bearer token: the token file's content if one is set (a file keeps
    the secret out of the process list), else --stats-token."""
    if config.stats_token_file:
        with open(config.stats_token_file, encoding="utf-8") as handle:
            token = handle.read().strip()
        if not token:
            raise ValueError(f"the stats token file {config.stats_token_file} is empty")
        return token
    return config.stats_token


def _inherited_socket(fd: int) -> socket.socket:
    """A worker's socket handed across an upgrade's exec; closed already if ``fd`` is -1 (it
    had ended: the reaper will see its worker go)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=None if fd < 0 else fd)
    if fd < 0:
        sock.close()
        return sock
    os.set_inheritable(fd, False)
    sock.setblocking(False)
    return sock


def _active_calls(records) -> int:
    """Calls in progress in these workers, as of their last heartbeats."""
    return sum(w.counters.get("active", 0) for w in records)


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass   # already gone; the reaper will record how
