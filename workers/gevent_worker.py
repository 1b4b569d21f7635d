"""The gevent worker: accepts calls on the inherited listening socket, one greenlet per call.

Accepting (workers.acceptor) is one connection per wakeup, and only while the worker has room: a
busy or full worker leaves calls in the kernel queue for its siblings instead of hoarding them.
Everything the master needs to know travels on the worker's socketpair as
msgpack (gateway.ipc), batched once a second; nothing on the call path talks to the master.
"""

from __future__ import annotations

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

from gateway import ipc
from gateway.app import load_app
from gateway.session import Counters, SessionClosed, Session, SessionSettings
from workers.acceptor import Acceptor
from workers.base import EXIT_BOOT_ERROR, EXIT_OK, WorkerSpec, set_title
from workers.loop_watchdog import LoopWatchdog

log = logging.getLogger("esl_gateway.worker")

HEARTBEAT_INTERVAL = 1.0   # at most; a short --timeout needs several heartbeats within it
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
        self.watchdog = LoopWatchdog(MAX_BLOCKING_REPORT)
        self.started = time.time()
        self.sessions: set[Session] = set()
        self.calls: set[gevent.Greenlet] = set()   # one per accepted call, until it ends
        self._stop = Flag()
        self._graceful = True
        self._stop_reason = ""
        self._stop_detail = ""
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
        # Every call is a greenlet: recording who spawned it, and that greenlet's stack, is work
        # and memory per call that nothing here reads.
        gevent.config.track_greenlet_tree = False
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
        self.max_calls = (self.config.max_calls + random.randint(0, self.config.max_calls_jitter)
                          if self.config.max_calls else 0)
        self.acceptor = Acceptor(self.spec.listeners, self._on_connection, self.spec.slot)
        self.acceptor.start()
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
        # Any that came while we booted is delivered now, to the handlers above.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.spec.blocked_signals)

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
        self.acceptor.close()   # at once: not one more call for a worker that is leaving
        self._stop.set()

    def _drain(self) -> int:
        # Tell the master first: it starts this slot's replacement while we drain.
        self._send("draining", reason=self._stop_reason)
        active = len(self.calls)
        log.info("worker %d (pid %d) %s; %s %d call(s)", self.spec.slot, os.getpid(),
                 self._stop_detail, "draining" if self._graceful else "closing", active)
        self._state = "draining"
        self._title()
        timeout = self.config.graceful_timeout if self._graceful else 0
        calls = list(self.calls)
        if len(gevent.joinall(calls, timeout=timeout)) < len(calls):
            self._close_calls("the graceful timeout" if self._graceful else self._stop_detail)
        gevent.joinall(calls)
        self._send_heartbeat()
        return EXIT_OK

    def _close_calls(self, why: str) -> None:
        """End every call now, one log line each: nothing is cut silently."""
        for session in list(self.sessions):
            log.warning("[%s] closing call still up: %s", session.uuid, why)
        try:
            gevent.killall(list(self.calls), timeout=QUICK_STOP_SECONDS)
        except gevent.Timeout:
            pass   # a handler that ignores GreenletExit: _drain goes on waiting for it

    # -- calls ------------------------------------------------------------------------------

    def _on_connection(self, conn) -> None:
        """From the acceptor (a loop callback): start the call's greenlet, and stop accepting
        while the worker is full."""
        self.calls_total += 1
        call = gevent.spawn(self._serve_call, conn)
        call.rawlink(self._call_ended)   # also when killed before it ever ran
        self.calls.add(call)
        if len(self.calls) >= self.config.worker_connections:
            self.acceptor.set_full(True)
        if self.max_calls and self.calls_total >= self.max_calls:
            self.stop("recycled", f"served its {self.max_calls} calls (--max-calls)", True)

    def _call_ended(self, call) -> None:
        self.calls.discard(call)
        if len(self.calls) < self.config.worker_connections:
            self.acceptor.set_full(False)

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
        self._send("hb", active=len(self.calls), calls=self.calls_total,
                   failed=self.calls_failed, handler_exceptions=self.handler_exceptions,
                   protocol_errors=counters.protocol_errors, events=counters.events,
                   commands=counters.commands, accept_errors=self.acceptor.errors,
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
        calls = len(self.calls)
        state = {"ready": f"{calls} calls", "draining": f"draining {calls} calls"}.get(
            self._state, self._state)
        title = f"worker {self.spec.slot} [gen {self.spec.generation}] {state}"
        if title != self._shown_title:
            self._shown_title = title
            set_title(title)
