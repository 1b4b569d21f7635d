"""The gevent worker: accepts calls on the inherited listening socket, one greenlet per call.

Accepting (workers.acceptor) is one connection per wakeup, and only while the worker has room: a
busy or full worker leaves calls in the kernel queue for its siblings instead of hoarding them.
Counters go to the worker's page of shared memory (gateway.scoreboard), exact even if the worker
dies without a word; what the worker *says* (ready, draining, how and why it ends, its
tracebacks) travels on its socketpair as msgpack (gateway.ipc). Nothing on the call path waits
for the master.
"""

from __future__ import annotations

import _socket
import faulthandler
import logging
import os
import random
import signal
import socket
import sys
import time
import traceback
from socket import SCM_RIGHTS, SOL_SOCKET

import gevent
from gevent import monkey
from gevent.event import Event as Flag
from gevent.lock import Semaphore

from gateway import ipc
from gateway.allowlist import Allowlist
from gateway.app import load_app
from gateway.logsafe import RateLimitedLog, loggable
from gateway.scoreboard import INDEX
from gateway.session import (Counters, ESLError, HandshakeTimeout, SessionClosed, Session,
                             SessionSettings, close_after_poll)
from workers.acceptor import Acceptor
from workers.base import EXIT_BOOT_ERROR, EXIT_OK, WorkerSpec, exit_status, set_title
from workers.loop_watchdog import LoopWatchdog
from workers.proxy import Backends, ProxiedCall

log = logging.getLogger("esl_gateway.worker")

HEARTBEAT_INTERVAL = 1.0   # at most; a short --timeout needs several heartbeats within it
QUICK_STOP_SECONDS = 2.0
MAX_BLOCKING_REPORT = 1.0   # the watchdog writes the stack of a loop blocked this long
HANGUP_WAIT = 5.0   # after hanging up a call the handler failed, wait this long for the hangup
CALLS, COMPLETED, FAILED, ACTIVE, SERVED, UNPROTECTED = (
    INDEX[name] for name in ("calls", "completed", "failed", "active", "served", "unprotected"))
RESUMED, RESUMED_FALLBACK, RESUMED_GONE, RESUMED_FAILED = (
    INDEX[name] for name in ("resumed", "resumed_fallback", "resumed_gone", "resumed_failed"))
HANDSHAKE_LOG_INTERVAL = 10.0   # at most one line per interval about silent peers
# FreeSWITCH answers `connect` within milliseconds: a connection holds a call slot
# (--worker-connections) for this long at most while it waits for its channel data, so a burst
# of real calls is still spread over the workers (a handshake that took no slot would let one
# worker take a whole backlog), while a silent peer soon gives its slot back.
HANDSHAKE_GRACE = 0.1


class GeventWorker:
    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.config = spec.config
        self.scores = spec.counters.values   # shared with the master: see gateway.scoreboard
        self.counters = Counters()   # the sessions' own; copied to scores as each call ends
        self.calls_total = 0
        self._held: set = set()   # calls up at the last heartbeat, until the worker has served
        self._exit_code = EXIT_OK
        self.watchdog = LoopWatchdog(MAX_BLOCKING_REPORT)
        self.started = time.time()
        self.sessions: dict[int, Session] = {}   # by call id
        self.calls: dict[gevent.Greenlet, int] = {}   # one per call, until it ends: its call id
        # Connections still waiting for their channel data, by call id: for HANDSHAKE_GRACE
        # they hold a call slot (their timer runs), then they count against --max-handshakes
        # instead (silent): a silent peer costs memory, not capacity.
        self._young: dict[int, object] = {}
        self._silent: set[int] = set()
        self._log_silent = RateLimitedLog(log, HANDSHAKE_LOG_INTERVAL)
        self._log_handshakes_full = RateLimitedLog(log, HANDSHAKE_LOG_INTERVAL)
        self._too_many_silent = False   # at --max-handshakes now
        self.ledger = spec.ledger   # copies of our calls' sockets go to the master (gateway.ipc)
        self.ledger.setblocking(False)   # a full ledger costs a call its survival, not a wait
        self._handed_over: set[int] = set()   # call ids left to the master for another worker
        self._master_fds: list[int] = []   # sockets the master sent, not yet taken by a message
        self._stop = Flag()
        self._graceful = True
        self._stop_reason = ""
        self._stop_detail = ""
        self._send_lock = Semaphore()
        self._warned_not_full = False
        self._state = "booting"    # booting, spare, ready, draining
        self._shown_title = ""

    # -- life cycle -------------------------------------------------------------------------

    def run(self) -> int:
        # A blocked loop is found twice over: our watchdog writes the stack of the code blocking
        # it after MAX_BLOCKING_REPORT, and at --timeout the master sends SIGABRT, on which
        # faulthandler writes every thread's stack. Both go to stderr (journald).
        faulthandler.enable()
        prepare()
        from gevent import socket as gsocket   # after patching: the cooperative socket type
        self.channel = gsocket.socket(fileno=self.spec.channel.detach())
        self._title()
        self._install_signals()
        try:
            self.app = load_app(self.config.app) if self.config.app else None
            self.resume_hook = load_app(self.config.resume) if self.config.resume else None
        except BaseException:
            text = traceback.format_exc()
            log.error("worker %s cannot load app %s:\n%s", self.spec.slot or "spare",
                      self.config.app, text)
            self._send("boot_error", traceback=text)
            return EXIT_BOOT_ERROR
        self.proxy = Backends(self.config.proxy) if self.config.proxy else None
        self.settings = SessionSettings(
            command_timeout=self.config.command_timeout, wait_timeout=self.config.wait_timeout,
            linger=self.config.linger,
            max_frame_size=self.config.max_frame_size,
            max_queued_events=self.config.max_queued_events,
            handshake_timeout=self.config.handshake_timeout,
            frame_timeout=self.config.frame_timeout,
            max_header_block=self.config.max_header_block, max_headers=self.config.max_headers,
            max_line_length=self.config.max_line_length)
        self.watchdog.start()   # after the app's import, which may legitimately take long
        self.max_calls = (self.config.max_calls + random.randint(0, self.config.max_calls_jitter)
                          if self.config.max_calls else 0)
        self.acceptor = Acceptor(self.spec.listeners, self._on_connection,
                                 Allowlist(self.config.allow))
        gevent.spawn(self._heartbeat_loop)
        gevent.spawn(self._watch_master)
        if self.spec.slot:
            self._serve(self.spec.slot)
        else:   # a spare: booted, waiting for the master to give it a dead worker's slot
            self._send("spare")
            self._state = "spare"
            self._title()
        try:
            self._stop.wait()
            return self._drain()
        except SystemExit as exc:   # sys.exit() in a greenlet of the app's own, not a handler
            code = exit_status(exc)
            self._send("app_exit", code=code, traceback=traceback.format_exc())
            return code
        except BaseException:
            text = traceback.format_exc()
            self._send("crash", traceback=text)
            raise

    def _serve(self, slot: int) -> None:
        """Start accepting calls as worker ``slot``."""
        self.spec.slot = slot
        self.acceptor.start()
        self._send("ready")
        self._state = "ready"
        self._title()
        log.info("worker %d (pid %d) ready, generation %d", slot, os.getpid(),
                 self.spec.generation)

    def _install_signals(self) -> None:
        # The master's own signals (HUP, USR2, ...) are ignored here since fork(): a stray one,
        # sent to the whole unit, must not kill calls (Master.IGNORED_BY_CHILDREN).
        gevent.signal_handler(signal.SIGTERM, self.stop, "drained", "asked to stop (SIGTERM)",
                              True)
        gevent.signal_handler(signal.SIGQUIT, self.stop, "stopped", "asked to quit (SIGQUIT)",
                              False)
        gevent.signal_handler(signal.SIGINT, self.stop, "stopped", "interrupted (SIGINT)", False)
        # Any that came while we booted is delivered now, to the handlers above.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.spec.blocked_signals)

    def stop(self, reason: str, detail: str, graceful: bool) -> None:
        """Stop accepting; graceful keeps calls until they end, quick closes them now.

        ``reason`` is the exit's classification for the master: drained, stopped, recycled,
        orphaned or app_exit.
        """
        if self._state in ("booting", "spare"):
            # No call accepted yet, and the app may take long to load (or never finish): an
            # abandoned reload must not leave workers stuck in boot behind it.
            log.info("worker %d (pid %d) %s while booting; exiting", self.spec.slot,
                     os.getpid(), detail)
            self._send("bye", reason=reason)
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
        self._update_scores()
        # The last word: without it the master counts this exit as a crash, whatever its code.
        self._send("bye", reason=self._stop_reason)
        return self._exit_code

    def _close_calls(self, why: str) -> None:
        """End every call now, one log line each: nothing is cut silently. With a resume hook
        the calls are not ended but left to the master (detached, no FIN), which hands them to
        a worker of the serving generation."""
        for call_id, session in list(self.sessions.items()):
            if self.resume_hook is not None and call_id in self.calls.values():
                log.warning("[%s] handing the call over to another worker: %s", session.uuid, why)
                self._handed_over.add(call_id)
                session.detach(f"handed over to another worker: {why}")
            else:
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
        call_id = self.calls_total
        scores = self.scores
        scores[CALLS] += 1
        if self.config.call_survival:
            try:   # one sendmsg: the master holds a copy of the socket from now on
                self.ledger.sendmsg([ipc.ledger_record(ipc.OPENED, call_id)], [
                    (SOL_SOCKET, SCM_RIGHTS, conn.fileno().to_bytes(4, sys.byteorder))])
            except OSError as exc:
                scores[UNPROTECTED] += 1
                log.warning("call %d cannot be handed to the master (%s): it will not survive "
                            "this worker's death", call_id, exc)
        if not self.proxy:   # in proxy mode the backend, not this worker, says connect
            timer = self._young[call_id] = gevent.get_hub().loop.timer(HANDSHAKE_GRACE)
            timer.start(self._gone_quiet, call_id)
        self._add_call(self._proxy_call if self.proxy else self._serve_call, conn, call_id)
        if self.max_calls and self.calls_total >= self.max_calls:
            self.stop("recycled", f"served its {self.max_calls} calls (--max-calls)", True)

    def _add_call(self, serve, conn, call_id: int, *args) -> None:
        """Run ``serve(conn, call_id, *args)`` in the call's greenlet; stop accepting while the
        worker is full."""
        call = gevent.spawn(serve, conn, call_id, *args)
        call.rawlink(self._call_ended)   # also when killed before it ever ran
        self.calls[call] = call_id
        self._update_room()

    def _call_ended(self, call) -> None:
        call_id = self.calls.pop(call)
        if call_id in self._handed_over:
            self._handed_over.discard(call_id)
        elif self.config.call_survival:
            try:   # the master closes its copy of the socket
                self.ledger.send(ipc.ledger_record(ipc.CLOSED, call_id))
            except OSError:
                pass   # the master is gone (or not reading): it learns at our exit
        self._forget_handshake(call_id)   # killed before its handshake ended
        self._update_room()

    def _update_room(self) -> None:
        """Accept while there is room both for calls (--worker-connections: calls, and
        connections in their first HANDSHAKE_GRACE) and for silent connections
        (--max-handshakes)."""
        silent = len(self._silent)
        slots_held = len(self.calls) - silent
        # Every connection held, handshakes included: one this worker dies with is a lost call.
        self.scores[ACTIVE] = len(self.calls)
        too_many_silent = silent >= self.config.max_handshakes
        if too_many_silent and not self._too_many_silent:   # logged as it starts
            self._log_handshakes_full(logging.WARNING, "%d connections wait for their channel "
                                      "data (--max-handshakes): not accepting until some answer "
                                      "or time out", silent)
        self._too_many_silent = too_many_silent
        self.acceptor.set_full(slots_held >= self.config.worker_connections or too_many_silent)

    def _gone_quiet(self, call_id: int) -> None:
        """HANDSHAKE_GRACE has passed without channel data: give the call slot back."""
        self._young.pop(call_id).close()
        self._silent.add(call_id)
        self._update_room()

    def _forget_handshake(self, call_id: int) -> bool:
        """Stop counting the call as a handshake; True if it was counted silent."""
        timer = self._young.pop(call_id, None)
        if timer is not None:
            timer.close()
            return False
        if call_id in self._silent:
            self._silent.remove(call_id)
            return True
        return False

    def _handshake_over(self, call_id: int) -> None:
        if self._forget_handshake(call_id):   # it takes its call slot again
            self._update_room()

    def _serve_call(self, conn, call_id: int) -> None:
        session = Session(conn, self.settings, self.counters)
        self.sessions[call_id] = session
        completed = False
        try:
            try:
                try:
                    session.start()
                finally:
                    self._handshake_over(call_id)
                if session.full:
                    session.linger()   # finite: HANGUP_COMPLETE arrives, the call is released
                else:
                    self._warn_not_full(session)
            except HandshakeTimeout:
                self.scores[INDEX["handshake_timeouts"]] += 1
                self._log_silent(logging.WARNING, "closed a connection that did not answer "
                                 "connect within %ss (--handshake-timeout)",
                                 self.settings.handshake_timeout)
                return
            except SessionClosed as exc:
                log.info("call ended before its handler started: %s", exc)
                return
            completed = self._run_app(session, self.app, "handler", self.config.app)
        except Exception:
            log.exception("[%s] call setup failed; ending this call", session.uuid)
        finally:
            self._end_call(call_id, session, completed)

    def _run_app(self, session: Session, function, role: str, name: str) -> bool:
        """Run the app's ``function`` (its handler, or its resume hook) on the call; True if
        the call completed. Whatever it raises costs only this call (see --on-handler-error)."""
        try:
            function(session)
            return True
        except SessionClosed as exc:   # the caller hung up, or FreeSWITCH ended the socket
            log.info("[%s] call ended under the %s: %s", session.uuid, role, exc)
            return True
        except SystemExit as exc:
            self._app_exit(session, exc, role, name)
        except Exception:
            self.scores[INDEX["handler_exceptions"]] += 1
            log.exception("[%s] %s %s raised; %s (--on-handler-error)", session.uuid, role, name,
                          _describe(self.config.on_handler_error))
            self._give_up(session, self.config.on_handler_error)
        return False

    def _end_call(self, call_id: int, session: Session, completed: bool,
                  by_the_app: bool = True) -> None:
        """``by_the_app``: the app's handler or resume hook ran the call, so its completion
        proves the app serves (gateway.backoff); an --orphan-action proves nothing of the app."""
        del self.sessions[call_id]
        session.close("the handler returned")
        self.scores[COMPLETED if completed else FAILED] += 1
        if completed and by_the_app:
            self._served()
        self._update_scores()

    def _proxy_call(self, conn, call_id: int, resumed: bool = False) -> None:
        """Proxy mode: relay the call to a backend (workers.proxy)."""
        completed = False
        try:
            completed = ProxiedCall(conn, self.proxy, self.config, self.settings,
                                    self.counters).run(resumed)
        except Exception:
            log.exception("relaying call %d failed; ending it", call_id)
        finally:
            close_after_poll(conn)
            self.scores[COMPLETED if completed else FAILED] += 1
            if completed:
                self._served()
            self._update_scores()

    def _resume_call(self, conn, call_id: int, origin: str) -> None:
        """Take over a call whose worker died (or whose generation had to close): realign the
        stream, read the channel afresh, restore what the session must know (linger, events),
        then run the resume hook, or --orphan-action without one. In proxy mode, a backend
        takes it over as a new call."""
        if self.proxy:
            self.scores[RESUMED] += 1
            log.warning("resumed call %s (%s): relaying it to a backend as a new call", call_id,
                        origin)
            self._proxy_call(conn, call_id, resumed=True)
            return
        session = Session(conn, self.settings, self.counters)
        self.sessions[call_id] = session
        completed, by_the_app = False, True
        scores = self.scores
        try:
            try:
                session.reattach()
            except SessionClosed as exc:
                scores[RESUMED_GONE] += 1
                log.info("call %s (%s) had ended before it could be resumed: %s", call_id,
                         origin, exc)
                return
            if session.hungup:   # the fresh CHANNEL_DATA says the channel is down
                scores[RESUMED_GONE] += 1
                log.info("[%s] call %s (%s) had hung up before it could be resumed",
                         session.uuid, call_id, origin)
                return
            if session.full:
                session.linger()
            session.ensure_events()
            if self.resume_hook is None:
                scores[RESUMED_FALLBACK] += 1
                log.warning("[%s] resumed call (%s): no --resume hook, so %s (--orphan-action)",
                            session.uuid, origin, _describe(self.config.orphan_action))
                self._give_up(session, self.config.orphan_action)
                completed, by_the_app = True, False
                return
            scores[RESUMED] += 1
            log.warning("[%s] resumed call (%s) in worker %d, generation %d", session.uuid,
                        origin, self.spec.slot, self.spec.generation)
            completed = self._run_app(session, self.resume_hook, "resume hook",
                                      self.config.resume)
        except Exception:
            scores[RESUMED_FAILED] += 1
            log.exception("[%s] resuming call %s (%s) failed; ending it", session.uuid, call_id,
                          origin)
        finally:
            self._end_call(call_id, session, completed, by_the_app)

    def _give_up(self, session: Session, action) -> None:
        """End a call the gateway cannot go on with as ``action`` says (--on-handler-error,
        --orphan-action): hang it up or transfer it, and wait (bounded) until FreeSWITCH has
        done it; for ``dialplan`` just close, so the dialplan runs its next action."""
        if action.kind == "dialplan" or session.hungup or session.closed:
            return
        try:
            if action.kind == "hangup":
                session.hangup(action.argument)
                session.wait_hungup(HANGUP_WAIT)
            else:   # transfer: the channel leaves the socket app for another extension, and
                # once the app has run our closing the socket just ends this listener.
                session.execute("transfer", action.argument, wait=session.has_events,
                                timeout=HANGUP_WAIT)
        except ESLError as exc:
            log.info("[%s] could not carry out %s: %s", session.uuid, action, exc)

    def _app_exit(self, session: Session, exc: SystemExit, role: str, name: str) -> None:
        """The handler (or resume hook) called sys.exit(): the app wants this process gone.
        The call ends as after any handler failure; the worker stops accepting, lets its other
        calls finish and exits with the app's code (its replacement starts at once)."""
        code = exit_status(exc)
        text = traceback.format_exc()
        log.error("[%s] %s %s called sys.exit(%r); %s, and this worker stops accepting, "
                  "finishes its other calls and exits with code %d\n%s", session.uuid, role,
                  name, exc.code, _describe(self.config.on_handler_error), code, text.rstrip())
        self._send("app_exit", code=code, traceback=text)
        self._give_up(session, self.config.on_handler_error)
        if not self._stop.is_set():
            self._exit_code = code
            self.stop("app_exit", f"the app called sys.exit({exc.code!r})", True)

    def _served(self) -> None:
        """This worker has proved it serves calls: see gateway.backoff for what that decides."""
        self.scores[SERVED] = 1
        self._held = set()

    def _update_scores(self) -> None:
        """Copy the counters kept elsewhere (sessions, acceptor, watchdog) to the shared page."""
        scores, counters = self.scores, self.counters
        scores[INDEX["events"]] = counters.events
        scores[INDEX["commands"]] = counters.commands
        scores[INDEX["protocol_errors"]] = counters.protocol_errors
        scores[INDEX["accept_errors"]] = self.acceptor.errors
        scores[INDEX["peers_refused"]] = self.acceptor.refused
        scores[INDEX["longest_block_ms"]] = int(self.watchdog.longest_block * 1000)

    def _warn_not_full(self, session: Session) -> None:
        if not self._warned_not_full:
            self._warned_not_full = True
            log.warning("[%s] the dialplan's socket app lacks `full` (Socket-Mode %s, Control "
                        "%s): linger, api, bgapi and event are refused, so hangup events may be "
                        "lost. Use `socket host:port async full` (logged once per worker).",
                        session.uuid, loggable(session.socket_mode), loggable(session.control))

    # -- the master -------------------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        """The master's proof that this loop turns; also the clock for "held a call a while"."""
        interval = min(HEARTBEAT_INTERVAL, (self.config.timeout or HEARTBEAT_INTERVAL) / 4)
        while True:
            if self.proxy:
                self._send("hb", proxy=self.proxy.report())
            else:
                self._send("hb")
            self._update_scores()
            if not self.scores[SERVED]:
                if self._held.isdisjoint(self.calls):   # a silent peer proves nothing
                    self._held = {call for call, call_id in self.calls.items()
                                  if call_id not in self._young and call_id not in self._silent}
                else:   # a call up at the last heartbeat still is: its handler runs fine
                    self._served()
            self._title()
            gevent.sleep(interval)

    def _watch_master(self) -> None:
        """The master's word (a spare is given a slot); EOF on our socketpair means the master
        is gone: drain rather than serve unsupervised."""
        reader = ipc.MessageReader()
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.channel, 65536, 64)
            except OSError:
                data, fds = b"", []
            if not data:
                self.stop("orphaned", "lost its master", True)
                return
            self._master_fds += fds
            for message in reader.feed(data):
                kind = message.get("t")
                if kind == "serve" and self._state == "spare":
                    self._serve(int(message["slot"]))
                elif kind == "listening":   # undrain: the listeners were shut down
                    self.acceptor.listening()
                elif kind == "resume":
                    conn = _socket.socket(fileno=self._master_fds.pop(0))
                    self._add_call(self._resume_call, conn, int(message["id"]),
                                   str(message.get("origin", "")))

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
        title = f"worker {self.spec.slot or 'spare'} [gen {self.spec.generation}] {state}"
        if title != self._shown_title:
            self._shown_title = title
            set_title(title)


def _describe(action) -> str:
    if action.kind == "hangup":
        return f"hanging the call up ({action.argument})"
    if action.kind == "transfer":
        return f"transferring the call to {action.argument}"
    return "handing the call back to the dialplan"


def prepare() -> None:
    """What every worker does before it can run: gevent's monkey-patching and logging's set-up
    (once per process; a worker forked by the fork server inherits them).

    Every call is a greenlet: recording who spawned it, and that greenlet's stack, is work and
    memory per call that nothing here reads, so the greenlet tree is not tracked.
    """
    if monkey.is_module_patched("socket"):
        return
    gevent.config.track_greenlet_tree = False
    _patch_all()
    # A log record asks for the current thread's name, which makes gevent build a thread object
    # for every greenlet that logs (a call); the format has no %(threadName)s.
    logging.logThreads = False


def _patch_all() -> None:
    """gevent's ``monkey.patch_all()``, with its plugin lookup done once instead of 25 times.

    patch_all asks for gevent plugins (entry points) before and after patching each module, and
    each question reads the metadata of every installed distribution: about 70 ms of a worker's
    150 ms boot here, paid again by every replacement of a crashed worker. The installed plugins
    cannot change during one patch_all, so one reading answers all the questions.
    """
    from importlib import metadata
    lookup = metadata.entry_points
    every = lookup()
    metadata.entry_points = lambda **selection: every.select(**selection) if selection else every
    try:
        monkey.patch_all()
    finally:
        metadata.entry_points = lookup
