"""FreeSWITCH's side of outbound Event Socket calls, for tests, ``probe``-style checks and load.

Each simulated call dials the gateway as the dialplan's ``socket`` app does (given a list of
hosts, the next one when a connect is refused or unreachable: gateway.failover), waits (up to 25 s,
like FreeSWITCH) for ``connect``, answers with a CHANNEL_DATA reply and then plays
mod_event_socket: replies to every command with FreeSWITCH's exact texts, queues ``sendmsg``
applications and runs them in order as the parked channel does, emits the events FreeSWITCH emits
(CHANNEL_PARK, EXECUTE, ANSWER, EXECUTE_COMPLETE with our Application-UUID, the hangup sequence),
lingers, sends the disconnect notice and closes. The caller may hang up on its own at any point
(the ``hangup-race`` scenario). Every call ends with exactly one outcome:

* ``completed``: the call was hung up and the connection then closed;
* ``early_close``: the gateway closed (or sent ``exit``) while the call was still up;
* ``refused`` / ``reset``: connection refused (by every host), or reset at any point;
* ``timeout``: no ``connect`` in time, the call outlived its deadline, or the gateway kept the
  socket open after the disconnect notice;
* ``protocol_error``: the gateway sent something FreeSWITCH would choke on.

It runs on gevent's event loop without monkey-patching, so it also runs inside pytest. A call is a
set of loop callbacks (socket readiness, timers) rather than greenlets: a load generator offering
hundreds of calls a second must not spend its CPU on greenlets, queues and timeouts.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import os
import random
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import NoReturn

import gevent
from gevent import socket as gsocket
from gevent.event import AsyncResult, Event

from gateway import failover, protocol
from gateway.protocol import Command, ProtocolError

OUTCOMES = ("completed", "early_close", "refused", "reset", "timeout", "protocol_error")
SCENARIOS = ("ivr", "hangup-race")
CORE_UUID = "5ca1ab1e-0000-4000-8000-000000000001"
WORKER_PID_VARIABLE = "gateway_worker_pid"


@dataclass
class CallOptions:
    scenario: str = "ivr"
    socket_mode: str = "async"          # what the connect reply says: async | static
    control: str = "full"               # full | single-channel
    hangup_after_ms: tuple[float, float] = (0.0, 2.0)   # hangup-race: caller hangs up in this window
    playback_ms: float = 0.0            # how long each playback runs
    event_interval: float | None = None  # emit a DTMF event this often while an app runs
    linger_cap: float = 0.2             # simulate at most this much of any linger time
    connect_wait: float = 25.0          # FreeSWITCH's wait for the first command
    close_grace: float = 5.0            # how long the gateway may keep the socket after we close
    call_deadline: float = 60.0
    connect_timeout: float = 5.0


@dataclass
class CallResult:
    outcome: str
    detail: str = ""
    uuid: str = ""
    accepted_ms: float | None = None     # the TCP handshake completed
    first_byte_ms: float | None = None   # TCP connect → `connect` received
    duration_ms: float = 0.0
    variables: dict[str, str] = field(default_factory=dict)   # set by the `set` app
    commands: list[str] = field(default_factory=list)
    ended_at: float = 0.0
    hangup_cause: str | None = None      # the cause the channel hung up with, if it did
    transferred_to: str | None = None    # the `transfer` app's argument, if the gateway sent one
    local_address: str = ""              # our end of the connection, "ip:port"
    host: str = ""                       # the target last dialled (the one that took the call)
    refused_by: list[str] = field(default_factory=list)   # targets that refused it, in order

    @property
    def served_by(self) -> int | None:
        """The worker pid, when the app reported it (``set gateway_worker_pid=<pid>``)."""
        pid = self.variables.get(WORKER_PID_VARIABLE, "")
        return int(pid) if pid.isdigit() else None


class _CallEnded(Exception):
    """Internal: the call has its outcome."""


class _Redialled(Exception):
    """Internal: the connect failed over; the call is dialling the next host."""


# Commands a single-channel (`async` without `full`) socket does not know.
_FULL_ONLY = frozenset(("linger", "nolinger", "event", "nixevent", "noevents", "api", "bgapi",
                        "log", "nolog", "sendevent"))


class _Request:
    """A command as the listener serves it: named and described once."""

    __slots__ = ("command", "name", "args", "description")

    def __init__(self, command: Command):
        self.command, self.name, self.args = command, command.name, command.args
        self.description = describe(command)


# Reads up to this size are cached by _whole_requests: a bare command or a hangup. Longer ones
# carry something of their call (an Event-UUID): caching those would only evict.
_CACHED_READ = 80


def _whole_requests(data: bytes) -> tuple[_Request, ...] | None:
    """The requests in a read that holds whole commands only (see protocol.whole_commands),
    or None. Short reads are made once for every call that reads the same bytes: most commands
    carry nothing of their call (``connect``, ``linger 10``, ``myevents``, a hangup)."""
    return (_cached_whole_requests if len(data) <= _CACHED_READ else _make_whole_requests)(data)


def _make_whole_requests(data: bytes) -> tuple[_Request, ...] | None:
    commands = protocol.whole_commands(data)
    return None if commands is None else tuple(map(_Request, commands))


_cached_whole_requests = functools.lru_cache(maxsize=256)(_make_whole_requests)


class SimulatedCall:
    """One call: a channel plus the mod_event_socket listener that serves its socket.

    Its work is done from event-loop callbacks, in one of two roles, which differ only in what a
    write error means:

    * the listener (reading and answering commands, its timeouts, static-mode apps, which run in
      the session thread) ends the call on an error, through ``_as_listener``;
    * the channel (async-mode apps, the caller's hangup, the linger) writes but never reads, so a
      write error is kept for the listener, which sees the same connection fail (``_as_channel``).
    """

    def __init__(self, targets, options: CallOptions, rng: random.Random):
        """``targets``: one (host, port), or a list of them tried in order as the dialplan's
        ``socket host1:port|host2:port`` does (gateway.failover)."""
        targets = deque([targets] if isinstance(targets, tuple) else targets)
        self.address, self.options, self.rng = targets.popleft(), options, rng
        self.next_targets = targets
        self.uuid = _uuid4()
        self.result = CallResult(outcome="", uuid=self.uuid, host=failover.describe(self.address))
        self.sock = None
        self.parser: protocol.CommandParser | None = None   # made when a read needs a framer
        self.connected = False            # `connect` received
        self.event_format: str | None = None
        self.subscribed: set[str] = set()
        self.linger: int | None = None    # None: no linger; -1: for ever; N seconds
        self.hungup = False
        self.finished = False             # the listener is done (disconnect sent or call over)
        self.running_app: tuple[str, str, str | None] | None = None
        self.hangup_cause = "NORMAL_CLEARING"
        self.answered = False
        self.write_error: OSError | None = None
        self.held: list[bytes] | None = None   # static mode: events raised by the running app
        self.hangup_announced = False
        self.apps: deque = deque()        # async mode: applications queued behind a playback
        self._app_busy = False            # async mode: an application (a playback) goes on
        self._playing = None              # (timer, done) of the playback going on
        self._paused = False              # static mode: an app holds the session: no reading
        self._pending: deque[_Request] = deque()   # read, not yet served
        uuid_line = protocol.serialize_headers_plain([("Unique-ID", self.uuid)])
        # A plain event's channel headers, by the channel's state (see _state).
        self._channel_lines = {state: uuid_line + lines for state, lines in _CHANNEL_LINES.items()}
        self._unsent: deque[bytes] = deque()   # frames the socket could not take yet
        self._shut_when_sent = False      # shut our side once the disconnect notice is out
        self._loop = gevent.get_hub().loop
        self._reader = None               # the socket's watcher: the handshake, then reads
        self._writer = None               # waits for the socket to take unsent frames
        self._wait = None
        self._timers: list = []
        self._ended = False
        self._started = 0.0
        self._on_done = None

    # -- the whole call ---------------------------------------------------------------------

    def run(self) -> CallResult:
        """Play the call to its end (in the calling greenlet) and return its result."""
        ended = AsyncResult()
        self._start(lambda result, error: ended.set(result) if error is None
                    else ended.set_exception(error))
        return ended.get()

    def _start(self, on_done) -> None:
        """Dial, and play the call from event-loop callbacks; ``on_done(result, error)`` is called
        once it is over (``error``: an unexpected exception, which is raised on too)."""
        self._on_done = on_done
        self._started = time.monotonic()
        self._as_listener(self._dial)

    def _as_listener(self, function, *args) -> None:
        """Run listener work: an outcome (or a failed connection) ends the call."""
        try:
            function(*args)
            return
        except _CallEnded:
            pass
        except _Redialled:
            return   # the call goes on, with the next host
        except ConnectionResetError as exc:
            self._record("reset", str(exc))
        except BrokenPipeError as exc:
            self._record("reset", f"write after the gateway closed: {exc}")
        except ProtocolError as exc:
            self._record("protocol_error", str(exc))
        except BaseException as exc:
            self._finish(exc)
            raise
        self._finish()

    def _as_channel(self, function, *args) -> None:
        """Run channel work; a write error is kept for the listener (see _peer_closed)."""
        try:
            function(*args)
        except OSError as exc:
            self.write_error = exc

    def _timer(self, seconds: float, callback, *args):
        """A loop timer, stopped when the call ends."""
        timer = self._loop.timer(seconds)
        timer.start(callback, *args)
        self._timers.append(timer)
        return timer

    def _later(self, seconds: float, function, *args):
        """Channel work after ``seconds``."""
        return self._timer(seconds, self._as_channel, function, *args)

    def _arm_wait(self, seconds: float) -> None:
        """(Re)start the listener's current wait: for the TCP handshake, for `connect`, or for
        the gateway to close after our disconnect notice (see _waited_too_long)."""
        if self._wait is not None:
            self._wait.stop()
        self._wait = self._timer(seconds, self._as_listener, self._waited_too_long)

    def _waited_too_long(self) -> None:
        if self.result.accepted_ms is None:
            self._dial_failed(socket.timeout("timed out"))
        if self.finished:
            self._end("timeout", "the gateway kept the socket open "
                                 f"{self.options.close_grace}s after the disconnect notice")
        self._end("timeout", f"no connect within {self.options.connect_wait}s "
                             "(FreeSWITCH gives up)")

    def _finish(self, error: BaseException | None = None) -> None:
        """The call is over: stop its watchers and timers, close the socket, hand the result on."""
        if self._ended:
            return
        self._ended = self.finished = True   # nothing is written any more
        for watcher in (self._reader, self._writer, *self._timers):
            if watcher is not None:
                watcher.close()
        if self.sock is not None:
            self.sock.close()
        self.result.ended_at = time.monotonic()
        self.result.duration_ms = (self.result.ended_at - self._started) * 1000
        self._on_done(self.result, error)

    # -- dialling ---------------------------------------------------------------------------

    def _dial(self) -> None:
        """Connect as FreeSWITCH does: to a literal address at once, without a resolver round
        trip (gevent resolves in a thread pool on every call: a sixth of a generator's CPU)."""
        family = _address_family(self.address[0])
        if family is None:   # a name: gevent's resolver, in a greenlet of its own
            gevent.spawn(self._as_listener, self._dial_name)
            return
        try:
            self.sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            error = self.sock.connect_ex(self.address)
        except OSError as exc:
            self._dial_failed(exc)
        if error != errno.EINPROGRESS:
            self._handshake_done(error)
            return
        self._reader = self._loop.io(self.sock.fileno(), 2)   # writable: the handshake is over
        self._reader.start(self._as_listener, self._on_handshake)
        self._arm_wait(self.options.connect_timeout)

    def _dial_name(self) -> None:
        try:
            sock = gsocket.create_connection(self.address, timeout=self.options.connect_timeout)
        except OSError as exc:
            self._dial_failed(exc)
        self.sock = socket.socket(fileno=sock.detach())
        self.sock.setblocking(False)
        self._handshake_done(0)

    def _on_handshake(self) -> None:
        self._reader.stop()
        self._reader.events = 1   # readable, from now on
        self._handshake_done(self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))

    def _dial_failed(self, exc: OSError) -> NoReturn:
        if isinstance(exc, socket.timeout):
            self._end("timeout", f"TCP handshake with {self.result.host}: {exc}")
        if isinstance(exc, ConnectionResetError):
            self._end("reset", str(exc))
        if failover.fails_over(exc):
            self.result.refused_by.append(self.result.host)
            if self.next_targets:
                self._redial(self.next_targets.popleft())
        self._end("refused", str(exc))   # refused, or unreachable: the connect fails at once

    def _redial(self, target: tuple[str, int]) -> NoReturn:
        """FreeSWITCH's next ``|`` host, at once: this one refused (or is unreachable)."""
        for closing in (self._reader, self.sock):
            if closing is not None:
                closing.close()
        self._reader = self.sock = None
        self.address, self.result.host = target, failover.describe(target)
        self._dial()
        raise _Redialled()

    def _handshake_done(self, error: int) -> None:
        if error:
            self._dial_failed(OSError(error, os.strerror(error)))
        self.result.accepted_ms = (time.monotonic() - self._started) * 1000
        host, port = self.sock.getsockname()[:2]
        self.result.local_address = f"{host}:{port}"
        # FreeSWITCH sets these on its outbound socket (mod_event_socket.c, socket_function).
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self._arm_wait(self.options.connect_wait)
        if self._reader is None:
            self._reader = self._loop.io(self.sock.fileno(), 1)
        self._reader.start(self._as_listener, self._on_readable)
        if self.options.scenario == "hangup-race":
            low, high = self.options.hangup_after_ms
            self._later(self.rng.uniform(low, high) / 1000, self._hangup, "NORMAL_CLEARING")
        self._timer(self.options.call_deadline, self._as_listener, self._end, "timeout",
                    f"call still up after {self.options.call_deadline}s")

    # -- the listener -----------------------------------------------------------------------

    def _on_readable(self) -> None:
        """mod_event_socket's listener: read commands and serve them.

        After the disconnect notice FreeSWITCH reads nothing more; we keep reading only to see
        the gateway close its side, which must happen promptly.
        """
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        if not data:
            self._peer_closed()
        if self.finished:
            return
        parser = self.parser
        requests = _whole_requests(data) if parser is None or not parser.mid_frame else None
        if requests is None:
            if parser is None:
                parser = self.parser = protocol.CommandParser()
            requests = [_Request(command) for command in parser.feed(data)]
        self._pending.extend(requests)
        self._serve()

    def _serve(self) -> None:
        """Reply to each command read, in order, until the listener is done or an app holds a
        static session; then the channel runs the apps queued meanwhile (FreeSWITCH's listener
        replies to commands read together before its channel thread gets to them)."""
        pending = self._pending
        while pending and not self.finished and not self._paused:
            request = pending.popleft()
            if not self.connected:
                self._on_connect(request)
                continue
            self.result.commands.append(request.description)
            self._on_command(request)
        if self.apps:
            self._as_channel(self._next_app)

    def _on_connect(self, first: _Request) -> None:
        if first.name != "connect":
            self._end("protocol_error", f"first command was {first.command.line!r}, not "
                                        "connect: FreeSWITCH swallows its reply and the client "
                                        "hangs")
        self._wait.stop()
        self.result.first_byte_ms = (time.monotonic() - self._started) * 1000
        self.connected = True
        self.result.commands.append(first.command.line)
        self._write(self._connect_reply())

    def _peer_closed(self) -> None:
        if self.write_error is not None:
            self._end("reset", f"write failed: {self.write_error}")
        if self.hungup:
            self._end("completed", "gateway closed after the hangup")
        if self.result.transferred_to is not None:
            self._end("completed", f"gateway closed after transferring the call to "
                                   f"{self.result.transferred_to}")
        if self.finished:
            self._end("early_close", "gateway sent exit while the call was up")
        self._end("early_close", "gateway closed while the call was up; the dialplan moves on")

    # -- commands ---------------------------------------------------------------------------

    def _on_command(self, request: _Request) -> None:
        command, name, args = request.command, request.name, request.args
        if name == "sendmsg":   # most commands
            self._on_sendmsg(request)
        elif self.options.control != "full" and name in _FULL_ONLY:
            self._reply("-ERR command not found")
        elif name == "myevents":
            if "myevents" in self.subscribed:
                self._reply("-ERR aready enabled.")
                return
            self.subscribed.add("myevents")
            self.event_format = "json" if "json" in args else "xml" if "xml" in args else "plain"
            self._reply("+OK Events Enabled")
            if self.options.socket_mode == "async" and not self.hungup:
                self._emit("CHANNEL_PARK")
        elif name == "linger":
            self.linger = int(args) if args.strip().lstrip("-").isdigit() else -1
            self._reply("+OK will linger" if self.linger < 0
                        else f"+OK will linger {self.linger} seconds")
        elif name == "nolinger":
            self.linger = None
            self._reply("+OK will not linger")
        elif name == "event":
            fmt, _, names = args.partition(" ")
            self.event_format = fmt if fmt in protocol.EVENT_FORMATS else "plain"
            if not names:
                self._reply("-ERR no keywords supplied")
                return
            self.subscribed.update(names.split())
            self._reply(f"+OK event listener enabled {self.event_format}")
        elif name == "api":
            self._write(protocol.api_response_frame(self._api(args).encode()))
        elif name == "bgapi":
            job_uuid = command.headers.get("Job-UUID") or _uuid4()
            self._reply(f"+OK Job-UUID: {job_uuid}", [("Job-UUID", job_uuid)])
            if {"BACKGROUND_JOB", "ALL"} & self.subscribed:
                self._emit("BACKGROUND_JOB", (("Job-UUID", job_uuid),
                                              ("Job-Owner-UUID", self.uuid),
                                              ("Job-Command", args.split(" ")[0])),
                           body=self._api(args).encode(), channel=False)
        elif name == "getvar":
            self._reply("-ERR command not found")
        elif name == "noevents":   # every subscription gone, myevents included
            self._reply("+OK no longer listening for events" if self.subscribed
                        else "-ERR not listening for events")
            self.subscribed.clear()
            self.event_format = None
        elif name in ("filter", "nixevent", "divert_events", "resume", "log", "nolog"):
            self._reply("+OK")
        elif name == "exit":
            self._reply("+OK bye")
            self._disconnect()
        elif name == "connect":
            self._write(self._connect_reply())
        else:
            self._reply("-ERR command not found")

    def _on_sendmsg(self, request: _Request) -> None:
        command = request.command
        headers = command.headers
        call_command = (headers.get("call-command") or "").lower()
        target = request.args.strip()
        if target and target != self.uuid:
            self._reply(f"-ERR invalid session id [{target}]")
            return
        if call_command == "execute":
            app = headers.get("execute-app-name") or ""
            arg = headers.get("execute-app-arg")
            if arg is None and command.body is not None:
                arg = command.body.decode("utf-8", "replace")
            if app == "set" and arg and "=" in arg:
                name, value = arg.split("=", 1)
                self.result.variables[name] = value
            if self.options.socket_mode == "static":
                self._run_app_inline(app, arg or "", headers.get("Event-UUID"))
                return
            self._reply("+OK")
            if not self.hungup:
                self.apps.append((app, arg or "", headers.get("Event-UUID")))
        elif call_command == "hangup":
            self._reply("+OK")
            self._hangup(headers.get("hangup-cause") or "NORMAL_CLEARING")
        else:
            self._reply("+OK")

    def _api(self, args: str) -> str:
        cmd = args.split(" ")[0]
        if cmd == "uuid_getvar":
            return self.uuid
        if cmd == "status":
            return "UP 0 years, 0 days\nFreeSWITCH (Version 1.11.2 simulated) is ready\n"
        return f"-ERR {cmd} Command not found!\n"

    # -- the channel ------------------------------------------------------------------------

    def _next_app(self) -> None:
        """Async sockets: the parked channel runs queued applications in order, each as soon as
        the one before is over (at once, unless a playback takes time)."""
        while self.apps and not self._app_busy:
            app, arg, event_uuid = self.apps.popleft()
            if not self.hungup:   # FreeSWITCH runs no queued app after hangup
                self._app_busy = not self._run_app(app, arg, event_uuid, self._app_over)

    def _app_over(self) -> None:
        self._app_busy = False
        self._next_app()

    def _run_app_inline(self, app: str, arg: str, event_uuid: str | None) -> None:
        """Static sockets: the app runs in the session thread before the reply, and the events
        it raised are written only after that reply (docs/esl-protocol.md §7). While it runs
        the session reads no command."""
        self.held = []
        if self._run_app(app, arg, event_uuid,
                         functools.partial(self._as_listener, self._static_app_over)):
            self._static_app_over()
        else:
            self._paused = True
            self._reader.stop()

    def _static_app_over(self) -> None:
        self._reply("+OK")
        held, self.held = self.held, None
        for frame in held:
            self._write(frame)
        if self.hungup:
            self._announce_static_hangup()
        if self._paused:
            self._paused = False
            self._reader.start(self._as_listener, self._on_readable)
            self._serve()

    def _run_app(self, app: str, arg: str, event_uuid: str | None, then) -> bool:
        """One application: CHANNEL_EXECUTE, its effect, CHANNEL_EXECUTE_COMPLETE.

        True when it is over; False while a playback goes on, and ``then()`` is called once that
        ends (played, or cut short by the hangup, whose sequence reports the app).
        """
        self.running_app = (app, arg, event_uuid)
        app_headers = _app_headers(app, arg, event_uuid)
        self._emit("CHANNEL_EXECUTE", *app_headers)
        response = "_none_"
        if app == "answer" and not self.answered:
            self.answered = True
            self._emit("CHANNEL_ANSWER")
        elif app == "playback":
            response = "FILE PLAYED"
            seconds = self.options.playback_ms / 1000
            if seconds > 0:
                if self.hungup:
                    return True   # cut short at once

                def played(interrupted: bool) -> None:
                    if not interrupted:
                        self._app_complete(app_headers, response)
                    then()
                self._play(seconds, played)
                return False
        elif app == "hangup":
            self.running_app = None
            self._hangup(arg or "NORMAL_CLEARING")
            return True
        elif app == "transfer":   # the channel leaves the socket app for another extension
            self.result.transferred_to = arg
        self._app_complete(app_headers, response)
        return True

    def _app_complete(self, app_headers: tuple[tuple[tuple[str, str], ...], ...], response: str
                      ) -> None:
        self.running_app = None
        self._emit("CHANNEL_EXECUTE_COMPLETE", *app_headers, (("Application-Response", response),))

    def _play(self, seconds: float, done) -> None:
        """Let a playback run (with a DTMF now and then, if asked), then ``done(False)``; a
        hangup meanwhile calls ``done(True)`` at once (see _hangup)."""
        interval = self.options.event_interval
        end = time.monotonic() + seconds

        def step(woke: bool) -> None:
            if woke and interval is not None and end - time.monotonic() > 0:
                self._emit("DTMF", (("DTMF-Digit", "1"), ("DTMF-Duration", "2000")))
            left = end - time.monotonic()
            if left <= 0:
                self._playing = None
                done(False)
                return
            timer = self._later(left if interval is None else min(left, interval), step, True)
            self._playing = (timer, done)
        step(False)

    def _hangup(self, cause: str) -> None:
        """The channel goes down: the hangup events, the linger, the disconnect notice; then a
        playback going on is cut short."""
        if self.hungup:
            return
        self.hangup_cause = self.result.hangup_cause = cause
        self.hungup = True
        self._hangup_sequence(cause)
        if self._playing is not None:
            (timer, done), self._playing = self._playing, None
            timer.stop()
            done(True)

    def _hangup_sequence(self, cause: str) -> None:
        if self.finished:
            return
        if not self.connected or self.linger is None:
            # Without linger the listener stops at once: events after this pass are lost.
            if self.connected:
                self._emit("CHANNEL_HANGUP", (("Hangup-Cause", cause),))
            self._disconnect()
            return
        if self.options.socket_mode == "static":
            if self.held is None:   # else the listener announces it after the app's reply
                self._announce_static_hangup()
            return
        self._emit("CHANNEL_HANGUP", (("Hangup-Cause", cause),))
        if self.running_app is not None:
            self._emit("CHANNEL_EXECUTE_COMPLETE", *_app_headers(*self.running_app),
                       (("Application-Response", "FILE NOT FOUND"),))
        self._emit("CHANNEL_UNPARK")
        self._emit("CHANNEL_EXECUTE_COMPLETE", (("Application", "socket"),))
        self._emit("CHANNEL_STATE", (("Channel-State", "CS_HANGUP"),))
        self._emit("CHANNEL_HANGUP_COMPLETE", (("Hangup-Cause", cause), ("variable_billsec", "0")))
        self._linger_then_disconnect()

    def _announce_static_hangup(self) -> None:
        """Static sockets: the linger notice comes before CHANNEL_HANGUP, and no later hangup
        event (CHANNEL_STATE, CHANNEL_HANGUP_COMPLETE) ever arrives (fixtures static_full*)."""
        if self.hangup_announced or self.finished:   # finished: no linger, already disconnected
            return
        self.hangup_announced = True
        self._linger_then_disconnect()
        self._emit("CHANNEL_HANGUP", (("Hangup-Cause", self.hangup_cause),))

    def _linger_then_disconnect(self) -> None:
        self._write(protocol.linger_notice_frame(self.uuid, _CHANNEL_NAME, self.linger))
        linger = self.options.linger_cap if self.linger < 0 else min(self.linger,
                                                                      self.options.linger_cap)
        self._later(linger, self._disconnect)

    def _disconnect(self) -> None:
        """Send the disconnect notice and close our side; the gateway must then close promptly."""
        if self.finished:
            return
        self._arm_wait(self.options.close_grace)
        try:
            self._write(protocol.disconnect_notice_frame(self.uuid))
        finally:
            self.finished = True   # nothing follows the notice
        if self._unsent:
            self._shut_when_sent = True
        else:
            self.sock.shutdown(socket.SHUT_WR)

    # -- writing ----------------------------------------------------------------------------

    def _reply(self, text: str, extra=()) -> None:
        self._write(protocol.reply_frame(text, extra) if extra else _reply_frame(text))

    def _emit(self, name: str, *extra: tuple[tuple[str, str], ...], body: bytes = b"",
              channel: bool = True) -> None:
        """Raise an event with the channel's headers and then ``extra``'s, if the gateway
        subscribed to it (else nothing is built)."""
        subscribed = self.subscribed
        if self.event_format is None or not (name in subscribed or "ALL" in subscribed or
                                             (channel and "myevents" in subscribed)):
            return
        timestamp = int(time.time() * 1e6)
        if self.event_format == "plain":   # each piece serialised once (see _plain_lines)
            frame = protocol.event_frame_plain(b"".join((
                _event_start(name), b"%d\n" % timestamp, self._channel_lines[self._state()],
                *map(_plain_lines, extra))), body)
        else:
            headers = [("Event-Name", name), ("Core-UUID", CORE_UUID),
                       ("Event-Date-Timestamp", str(timestamp)), *self._channel_headers()]
            for part in extra:
                headers += part
            frame = protocol.event_frame(headers, body, self.event_format)
        if self.held is not None:
            self.held.append(frame)
        else:
            self._write(frame)

    def _write(self, data: bytes) -> None:
        """Write one frame with a send() of its own, as FreeSWITCH does (no sendall: gevent's
        asks the kernel for the buffer size first, every time), unless the listener is done.
        What the socket cannot take now waits, frames still apart, until it can (_flush)."""
        if self.finished:
            return
        if self._unsent:
            self._unsent.append(data)
            return
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            self._unsent.append(data[sent:])
            if self._writer is None:
                self._writer = self._loop.io(self.sock.fileno(), 2)
            self._writer.start(self._as_channel, self._flush)

    def _flush(self) -> None:
        unsent = self._unsent
        try:
            while unsent:
                sent = self.sock.send(unsent[0])
                if sent < len(unsent[0]):
                    unsent[0] = unsent[0][sent:]
                    return
                unsent.popleft()
        except BlockingIOError:
            return
        except OSError:
            unsent.clear()
            self._writer.stop()
            raise
        self._writer.stop()
        if self._shut_when_sent:
            self.sock.shutdown(socket.SHUT_WR)

    def _record(self, outcome: str, detail: str) -> None:
        """The first outcome recorded is the call's outcome."""
        if not self.result.outcome:
            self.result.outcome, self.result.detail = outcome, detail

    def _end(self, outcome: str, detail: str) -> NoReturn:
        self._record(outcome, detail)
        raise _CallEnded()

    # -- channel data -----------------------------------------------------------------------

    def _state(self) -> str:
        """ringing, answered or hangup: what the channel's headers say of it."""
        return "hangup" if self.hungup else "answered" if self.answered else "ringing"

    def _channel_headers(self) -> list[tuple[str, str]]:
        return [("Unique-ID", self.uuid), *_CHANNEL_HEADERS[self._state()]]

    def _connect_reply(self) -> bytes:
        """The connect reply: the channel's data (CHANNEL_DATA) and the socket's mode. A
        connect after the hangup (a lingering socket) shows the channel down."""
        template = _connect_reply_template(time.strftime("%Y-%m-%d %H:%M:%S"), self._state(),
                                           self.address[0], self.options.socket_mode,
                                           self.options.control)
        return template.replace(_UUID_PLACEHOLDER, self.uuid.encode())


_CHANNEL_NAME = "loopback/9090-b"
# The channel's headers after its Unique-ID, by its state: (Channel-State, Answer-State).
_STATES = {"ringing": ("CS_EXECUTE", "ringing"), "answered": ("CS_EXECUTE", "answered"),
           "hangup": ("CS_HANGUP", "hangup")}
_CHANNEL_HEADERS = {state: (("Channel-Name", _CHANNEL_NAME), ("Channel-State", channel_state),
                            ("Answer-State", answer_state),
                            ("Caller-Caller-ID-Name", "Simulated Caller"),
                            ("Caller-Caller-ID-Number", "0000000000"),
                            ("Caller-Destination-Number", "9090"),
                            ("Caller-Context", "default"))
                    for state, (channel_state, answer_state) in _STATES.items()}
# ... and as a plain event's header lines.
_CHANNEL_LINES = {state: protocol.serialize_headers_plain(headers)
                  for state, headers in _CHANNEL_HEADERS.items()}
_CALL_STATES = {"ringing": "RINGING", "answered": "ACTIVE", "hangup": "HANGUP"}


def _uuid4() -> str:
    """``str(uuid.uuid4())`` without a UUID object (that costs more than a command's reply):
    random bits, version 4, the RFC 4122 variant."""
    bits = int.from_bytes(os.urandom(16), "big") & _UUID4_CLEAR | _UUID4_SET
    text = "%032x" % bits
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


# As uuid.UUID(version=4) sets them: the variant (10xx) and the version (0100).
_UUID4_CLEAR = ~((0xc000 << 48) | (0xf000 << 64))
_UUID4_SET = (0x8000 << 48) | (4 << 76)


def _channel_data(uuid: str, state: str, host: str, date_local: str
                  ) -> list[tuple[str, str]]:
    return [("Event-Name", "CHANNEL_DATA"), ("Core-UUID", CORE_UUID),
            ("FreeSWITCH-Hostname", "simulator"), ("Event-Date-Local", date_local),
            ("Unique-ID", uuid), *_CHANNEL_HEADERS[state],
            ("Channel-Call-State", _CALL_STATES[state]),
            ("variable_uuid", uuid), ("variable_socket_host", host),
            ("variable_current_application", "socket")]


# Stands for the call's uuid in _connect_reply_template. Every uuid serialises unchanged (no hex
# digit or dash is url-encoded), so the call's own replaces it byte for byte; no call has it.
_UUID_PLACEHOLDER = b"00000000-0000-0000-0000-000000000000"


@functools.lru_cache(maxsize=16)
def _connect_reply_template(date_local: str, state: str, host: str, socket_mode: str,
                            control: str) -> bytes:
    """The connect reply of every call of this second, with _UUID_PLACEHOLDER for its uuid
    (serialising the 20-odd headers of CHANNEL_DATA for each call was a tenth of the work)."""
    frame = protocol.connect_reply_frame(
        _channel_data(_UUID_PLACEHOLDER.decode(), state, host, date_local), socket_mode,
        control)
    assert frame.count(_UUID_PLACEHOLDER) == 2, "the placeholder is in the host name"
    return frame


def _app_headers(app: str, arg: str, event_uuid: str | None
                 ) -> tuple[tuple[tuple[str, str], ...], ...]:
    """The headers naming an application in CHANNEL_EXECUTE and CHANNEL_EXECUTE_COMPLETE, in
    parts for _emit: the app and its argument (the same in many calls), then its own uuid."""
    headers = (("Application", app), ("Application-Data", arg)),
    return headers + ((("Application-UUID", event_uuid),),) if event_uuid else headers


@functools.lru_cache(maxsize=256)
def _reply_frame(text: str) -> bytes:
    """A command reply without extra headers; calls send the same few texts again and again."""
    return protocol.reply_frame(text)


@functools.lru_cache(maxsize=256)
def _event_start(name: str) -> bytes:
    """A plain event's first header lines, up to its timestamp's value."""
    return protocol.serialize_headers_plain([("Event-Name", name), ("Core-UUID", CORE_UUID)]
                                            ) + b"Event-Date-Timestamp: "


@functools.lru_cache(maxsize=1024)
def _plain_lines(headers: tuple[tuple[str, str], ...]) -> bytes:
    """Header lines of a plain event, serialised once for all the calls and events that have
    them (causes, responses, apps and their arguments; an app's uuid serves its two events)."""
    return protocol.serialize_headers_plain(headers)


def describe(command: Command) -> str:
    """A command as an operator would name it: ``sendmsg execute playback``, ``linger 10``."""
    if command.name != "sendmsg":
        return command.line
    headers = command.headers
    words = [command.line, headers.get("call-command") or "", headers.get("execute-app-name")
             or ""]
    return " ".join(word for word in words if word)


# ------------------------------------------------------------------------------------------
# Load
# ------------------------------------------------------------------------------------------

@dataclass
class LoadResult:
    results: list[CallResult]
    elapsed: float

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(OUTCOMES, 0)
        for result in self.results:
            counts[result.outcome] = counts.get(result.outcome, 0) + 1
        return counts

    def failures(self) -> list[CallResult]:
        return [r for r in self.results if r.outcome != "completed"]

    def percentile(self, attribute: str, fraction: float) -> float | None:
        values = sorted(v for v in (getattr(r, attribute) for r in self.results) if v is not None)
        if not values:
            return None
        return values[min(int(fraction * len(values)), len(values) - 1)]

    def summary(self) -> dict:
        return {"calls": len(self.results), "elapsed_s": round(self.elapsed, 3),
                "outcomes": self.counts(),
                "first_byte_ms": {f"p{int(q * 100)}": self.percentile("first_byte_ms", q)
                                  for q in (0.5, 0.99)},
                "duration_ms": {f"p{int(q * 100)}": self.percentile("duration_ms", q)
                                for q in (0.5, 0.99)}}


@functools.lru_cache(maxsize=64)
def _address_family(host: str) -> int | None:
    """AF_INET or AF_INET6 for a literal address, None for a name."""
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return None


def run_load(address, calls: int, rate: float | None = None,
             concurrency: int | None = None, options: CallOptions | None = None,
             seed: int | None = None, on_result=None) -> LoadResult:
    """Offer ``calls`` calls, open loop at ``rate`` calls/s and/or at most ``concurrency`` at once,
    to ``address``: one (host, port), or a list of them failed over as the dialplan does.

    ``on_result(result)`` is called as each call ends (for live progress), from the event loop:
    it must not block on gevent.
    """
    options = options or CallOptions()
    rng = random.Random(seed)
    results: list[CallResult] = []
    active = 0
    call_ended = Event()   # set as each call ends, for a wait for a free slot or the last call

    def ended(result: CallResult, error: BaseException | None) -> None:
        nonlocal active
        active -= 1
        call_ended.set()
        if error is None:   # else it is raised on (and printed by the loop), uncounted
            results.append(result)
            if on_result is not None:
                on_result(result)

    def wait_while(busy) -> None:
        while busy():
            call_ended.clear()
            call_ended.wait()

    start = time.monotonic()
    for index in range(calls):
        if rate:
            delay = start + index / rate - time.monotonic()
            if delay > 0:
                gevent.sleep(delay)
        call = SimulatedCall(address, options, random.Random(rng.random()))
        if concurrency:
            wait_while(lambda: active >= concurrency)
        active += 1
        call._start(ended)
    wait_while(lambda: active)
    return LoadResult(results, time.monotonic() - start)
