"""The gevent worker: accepts calls on the inherited listening socket, one greenlet per call.

Accepting is one connection per wakeup, and only while the worker has room (its pool has a free
slot): a busy or full worker leaves calls in the kernel queue for its siblings instead of
hoarding them. Everything the master needs to know travels on the worker's socketpair as
msgpack (gateway.ipc), batched once a second; nothing on the call path talks to the master.
"""

from __future__ import annotations

import errno
import faulthandler
import logging
import os
import random
import signal
import time
import traceback

import gevent
from gevent import monkey
from gevent.event import Event as Flag
from gevent.lock import Semaphore
from gevent.pool import Pool

from gateway import ipc
from gateway.app import load_app
from gateway.session import Counters, SessionClosed, Session, SessionSettings
from workers.base import EXIT_BOOT_ERROR, EXIT_OK, WorkerSpec, set_title
from workers.loop_watchdog import LoopWatchdog

log = logging.getLogger("esl_gateway.worker")

HEARTBEAT_INTERVAL = 1.0   # at most; a short --timeout needs several heartbeats within it
# Accept failures such as EMFILE would repeat at once; back off instead of spinning the CPU.
ACCEPT_BACKOFF_MIN, ACCEPT_BACKOFF_MAX = 0.01, 1.0
# Errors about one connection that died in the queue: skip it and accept the next.
ACCEPT_SKIPPABLE = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ECONNRESET}
ACCEPT_ERROR_LOG_INTERVAL = 10.0   # at most one accept-error log line per interval
QUICK_STOP_SECONDS = 2.0
MAX_BLOCKING_REPORT = 1.0   # the watchdog writes the stack of a loop blocked this long


class GeventWorker:
    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.config = spec.config
        self.counters = Counters()
        self.calls_total = 0
        self.handler_exceptions = 0
        self.calls_failed = 0
        self.accept_errors = 0
        self.watchdog = LoopWatchdog(MAX_BLOCKING_REPORT)
        self.started = time.time()
        self.sessions: set[Session] = set()
        self._stop = Flag()
        self._graceful = True
        self._stop_reason = ""
        self._stop_detail = ""
        self._accept_errors_logged_at = 0.0
        self._accept_errors_unlogged = 0
        self._send_lock = Semaphore()
        self._warned_not_full = False
        self._state = "booting"    # booting, ready, draining: for the process title
        self._shown_title = ""

    # -- life cycle -------------------------------------------------------------------------

    def run(self) -> int:
        # A blocked loop is found twice over: our watchdog writes the stack of the code blocking
        # it after MAX_BLOCKING_REPORT, and at --timeout the master sends SIGABRT, on which
        # faulthandler writes every thread's stack. Both go to stderr (journald).
        faulthandler.enable()
        monkey.patch_all()
        from gevent import socket as gsocket   # after patching: the cooperative socket type
        self.channel = gsocket.socket(fileno=self.spec.channel.detach())
        self._title()
        self._install_signals()
        try:
            self.app = load_app(self.config.app)
        except BaseException:
            text = traceback.format_exc()
            log.error("worker %d cannot load app %s:\n%s", self.spec.slot, self.config.app, text)
            self._send("boot_error", traceback=text)
            return EXIT_BOOT_ERROR
        self.settings = SessionSettings(
            command_timeout=self.config.command_timeout, wait_timeout=self.config.wait_timeout,
            linger=self.config.linger,
            max_frame_size=self.config.max_frame_size,
            max_queued_events=self.config.max_queued_events)
        self.watchdog.start()   # after the app's import, which may legitimately take long
        self.pool = Pool(self.config.worker_connections)
        self.max_calls = (self.config.max_calls + random.randint(0, self.config.max_calls_jitter)
                          if self.config.max_calls else 0)
        self.listeners = [gsocket.socket(fileno=sock.detach()) for sock in self.spec.listeners]
        self.acceptors = [gevent.spawn(self._accept_loop, sock) for sock in self.listeners]
        gevent.spawn(self._heartbeat_loop)
        gevent.spawn(self._watch_master)
        self._send("ready")
        self._state = "ready"
        self._title()
        log.info("worker %d (pid %d) ready, generation %d", self.spec.slot, os.getpid(),
                 self.spec.generation)
        try:
            self._stop.wait()
            return self._drain()
        except BaseException:
            text = traceback.format_exc()
            self._send("crash", traceback=text)
            raise

    def _install_signals(self) -> None:
        # The master's own signals mean nothing here; a stray one must not kill calls.
        for name in ("SIGHUP", "SIGUSR1", "SIGUSR2", "SIGTTIN", "SIGTTOU", "SIGWINCH"):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
        gevent.signal_handler(signal.SIGTERM, self.stop, "drained", "asked to stop (SIGTERM)",
                              True)
        gevent.signal_handler(signal.SIGQUIT, self.stop, "stopped", "asked to quit (SIGQUIT)",
                              False)
        gevent.signal_handler(signal.SIGINT, self.stop, "stopped", "interrupted (SIGINT)", False)

    def stop(self, reason: str, detail: str, graceful: bool) -> None:
        """Stop accepting; graceful keeps calls until they end, quick closes them now.

        ``reason`` is the exit's classification for the master: drained, stopped, recycled or
        orphaned.
        """
        if self._state == "booting":
            # No call accepted yet, and the app may take long to load (or never finish): an
            # abandoned reload must not leave workers stuck in boot behind it.
            log.info("worker %d (pid %d) %s while booting; exiting", self.spec.slot,
                     os.getpid(), detail)
            self._send("draining", reason=reason)
            os._exit(EXIT_OK)
        if self._stop.is_set():
            if not graceful and self._graceful:   # a quick stop overrides a graceful one
                self._graceful = False
                gevent.spawn(self._close_calls, detail)
            return
        self._stop_reason, self._stop_detail, self._graceful = reason, detail, graceful
        self._stop.set()

    def _drain(self) -> int:
        for acceptor in self.acceptors:
            acceptor.kill()
        for sock in self.listeners:
            sock.close()   # our copy only: the master keeps the socket and its queue alive
        # Tell the master first: it starts this slot's replacement while we drain.
        self._send("draining", reason=self._stop_reason)
        active = len(self.pool)
        log.info("worker %d (pid %d) %s; %s %d call(s)", self.spec.slot, os.getpid(),
                 self._stop_detail, "draining" if self._graceful else "closing", active)
        self._state = "draining"
        self._title()
        timeout = self.config.graceful_timeout if self._graceful else 0
        if not self.pool.join(timeout=timeout):
            self._close_calls("the graceful timeout" if self._graceful else self._stop_detail)
        self.pool.join()
        self._send_heartbeat()
        return EXIT_OK

    def _close_calls(self, why: str) -> None:
        """End every call now, one log line each: nothing is cut silently."""
        for session in list(self.sessions):
            log.warning("[%s] closing call still up: %s", session.uuid, why)
        self.pool.kill(timeout=QUICK_STOP_SECONDS)

    # -- calls ------------------------------------------------------------------------------

    def _accept_loop(self, sock) -> None:
        backoff = ACCEPT_BACKOFF_MIN
        while not self._stop.is_set():
            self.pool.wait_available()
            try:
                conn, _ = sock.accept()   # gevent: one accept() per readiness wakeup
            except OSError as exc:
                if self._stop.is_set():
                    return
                self.accept_errors += 1
                if exc.errno in ACCEPT_SKIPPABLE:
                    continue
                self._log_accept_error(exc, backoff)
                gevent.sleep(backoff)
                backoff = min(backoff * 2, ACCEPT_BACKOFF_MAX)
                continue
            backoff = ACCEPT_BACKOFF_MIN
            self.calls_total += 1
            self.pool.spawn(self._serve_call, conn)
            if self.max_calls and self.calls_total >= self.max_calls:
                self.stop("recycled", f"served its {self.max_calls} calls (--max-calls)", True)

    def _log_accept_error(self, exc: OSError, backoff: float) -> None:
        """One line per ACCEPT_ERROR_LOG_INTERVAL, with how many were not logged meanwhile."""
        now = time.monotonic()
        if now - self._accept_errors_logged_at < ACCEPT_ERROR_LOG_INTERVAL:
            self._accept_errors_unlogged += 1
            return
        log.warning("worker %d: accept failed: %s (%d more since the last report); backing off "
                    "%.2fs, the listening socket stays open and calls wait in its queue",
                    self.spec.slot, exc, self._accept_errors_unlogged, backoff)
        self._accept_errors_logged_at, self._accept_errors_unlogged = now, 0

    def _serve_call(self, conn) -> None:
        session = Session(conn, self.settings, self.counters)
        self.sessions.add(session)
        try:
            try:
                session.start()
                if session.full:
                    session.linger()   # finite: HANGUP_COMPLETE arrives, the call is released
                else:
                    self._warn_not_full(session)
            except SessionClosed as exc:
                self.calls_failed += 1
                log.info("call ended before its handler started: %s", exc)
                return
            try:
                self.app(session)
            except SessionClosed as exc:
                log.info("[%s] call ended under the handler: %s", session.uuid, exc)
            except Exception:
                self.handler_exceptions += 1
                self.calls_failed += 1
                log.exception("[%s] handler %s raised; ending this call", session.uuid,
                              self.config.app)
        except Exception:
            self.calls_failed += 1
            log.exception("[%s] call setup failed; ending this call", session.uuid)
        finally:
            self.sessions.discard(session)
            session.close("the handler returned")

    def _warn_not_full(self, session: Session) -> None:
        if not self._warned_not_full:
            self._warned_not_full = True
            log.warning("[%s] the dialplan's socket app lacks `full` (Socket-Mode %s, Control "
                        "%s): linger, api, bgapi and event are refused, so hangup events may be "
                        "lost. Use `socket host:port async full` (logged once per worker).",
                        session.uuid, session.socket_mode, session.control)

    # -- the master -------------------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        interval = min(HEARTBEAT_INTERVAL, (self.config.timeout or HEARTBEAT_INTERVAL) / 4)
        while True:
            self._send_heartbeat()
            self._title()
            gevent.sleep(interval)

    def _send_heartbeat(self) -> None:
        counters = self.counters
        self._send("hb", active=len(self.pool), calls=self.calls_total,
                   failed=self.calls_failed, handler_exceptions=self.handler_exceptions,
                   protocol_errors=counters.protocol_errors, events=counters.events,
                   commands=counters.commands, accept_errors=self.accept_errors,
                   longest_block_ms=int(self.watchdog.longest_block * 1000))

    def _watch_master(self) -> None:
        """EOF on our socketpair means the master is gone: drain rather than serve unsupervised."""
        while True:
            try:
                data = self.channel.recv(4096)
            except OSError:
                data = b""
            if not data:
                self.stop("orphaned", "lost its master", True)
                return

    def _send(self, kind: str, **fields) -> None:
        fields.setdefault("pid", os.getpid())
        data = ipc.pack(kind, **fields)
        with self._send_lock:
            try:
                self.channel.sendall(data)
            except OSError:
                pass   # the master is gone; _watch_master starts the drain

    def _title(self) -> None:
        """``worker 2 [gen 3] 14 calls`` (or ``draining 3 calls``), refreshed with heartbeats."""
        calls = 0 if self._state == "booting" else len(self.pool)
        state = {"ready": f"{calls} calls", "draining": f"draining {calls} calls"}.get(
            self._state, self._state)
        title = f"worker {self.spec.slot} [gen {self.spec.generation}] {state}"
        if title != self._shown_title:
            self._shown_title = title
            set_title(title)
