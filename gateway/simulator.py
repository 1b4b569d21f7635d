"""FreeSWITCH's side of outbound Event Socket calls, for tests, ``probe``-style checks and load.

Each simulated call dials the gateway as the dialplan's ``socket`` app does, waits (up to 25 s,
like FreeSWITCH) for ``connect``, answers with a CHANNEL_DATA reply and then plays
mod_event_socket: replies to every command with FreeSWITCH's exact texts, queues ``sendmsg``
applications and runs them in order on a channel greenlet, emits the events FreeSWITCH emits
(CHANNEL_PARK, EXECUTE, ANSWER, EXECUTE_COMPLETE with our Application-UUID, the hangup sequence),
lingers, sends the disconnect notice and closes. The caller may hang up on its own at any point
(the ``hangup-race`` scenario). Every call ends with exactly one outcome:

* ``completed``: the call was hung up and the connection then closed;
* ``early_close``: the gateway closed (or sent ``exit``) while the call was still up;
* ``refused`` / ``reset``: connection refused, or reset at any point;
* ``timeout``: no ``connect`` in time, the call outlived its deadline, or the gateway kept the
  socket open after the disconnect notice;
* ``protocol_error``: the gateway sent something FreeSWITCH would choke on.

It uses gevent's sockets explicitly (no monkey-patching), so it also runs inside pytest.
"""

from __future__ import annotations

import functools
import ipaddress
import random
import socket
import time
import uuid as uuidlib
from dataclasses import dataclass, field

import gevent
from gevent import socket as gsocket
from gevent.event import Event as Flag
from gevent.lock import Semaphore
from gevent.pool import Pool
from gevent.queue import Queue

from gateway import protocol
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

    @property
    def served_by(self) -> int | None:
        """The worker pid, when the app reported it (``set gateway_worker_pid=<pid>``)."""
        pid = self.variables.get(WORKER_PID_VARIABLE, "")
        return int(pid) if pid.isdigit() else None


class _CallEnded(Exception):
    """Internal: the call has its outcome."""


class SimulatedCall:
    """One call: a channel plus the mod_event_socket listener that serves its socket."""

    def __init__(self, address: tuple[str, int], options: CallOptions, rng: random.Random):
        self.address, self.options, self.rng = address, options, rng
        self.uuid = str(uuidlib.uuid4())
        self.result = CallResult(outcome="", uuid=self.uuid)
        self.sock = None
        self.parser = protocol.CommandParser()
        self.write_lock = Semaphore()
        self.apps: Queue = Queue()
        self.connected = False            # `connect` received
        self.event_format: str | None = None
        self.subscribed: set[str] = set()
        self.linger: int | None = None    # None: no linger; -1: for ever; N seconds
        self.hungup = Flag()
        self.finished = Flag()            # the listener is done (disconnect sent or peer gone)
        self.running_app: tuple[str, str, str | None] | None = None
        self.hangup_cause = "NORMAL_CLEARING"
        self.answered = False
        self.side_greenlets: list = []     # channel loop and timers; only the listener reads
        self.write_error: OSError | None = None
        self.held: list[bytes] | None = None   # static mode: events raised by the running app
        self.hangup_announced = False
        self._pending: list[Command] = []
        self._channel_block: tuple[bool | None, bytes] = (None, b"")   # (answered, bytes)

    # -- the whole call ---------------------------------------------------------------------

    def run(self) -> CallResult:
        start = time.monotonic()
        try:
            self._run(start)
        except _CallEnded:
            pass
        except ConnectionResetError as exc:
            self._record("reset", str(exc))
        except BrokenPipeError as exc:
            self._record("reset", f"write after the gateway closed: {exc}")
        except ProtocolError as exc:
            self._record("protocol_error", str(exc))
        finally:
            if self.sock is not None:
                self.sock.close()
        if not self.result.outcome:
            self.result.outcome = "completed"
        self.result.ended_at = time.monotonic()
        self.result.duration_ms = (self.result.ended_at - start) * 1000
        return self.result

    def _run(self, start: float) -> None:
        try:
            self.sock = _dial(self.address, self.options.connect_timeout)
        except socket.timeout as exc:
            self._end("timeout", f"TCP handshake: {exc}")
        except ConnectionResetError as exc:
            self._end("reset", str(exc))
        except OSError as exc:   # refused, or unreachable: the connect fails at once either way
            self._end("refused", str(exc))
        self.result.accepted_ms = (time.monotonic() - start) * 1000
        self.sock.settimeout(None)
        # FreeSWITCH sets these on its outbound socket (mod_event_socket.c, socket_function).
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self._side(0, self._channel_loop)
        if self.options.scenario == "hangup-race":
            low, high = self.options.hangup_after_ms
            self._side(self.rng.uniform(low, high) / 1000, self._hangup, "NORMAL_CLEARING")
        try:
            with gevent.Timeout(self.options.call_deadline, False):
                self._listen(start)
                return
            self._end("timeout", f"call still up after {self.options.call_deadline}s")
        finally:
            gevent.killall(self.side_greenlets)

    def _side(self, delay: float, function, *args) -> None:
        """Run channel-side work in its own greenlet; it writes, never reads.

        A write error there is kept for the listener, which sees the same connection fail.
        """
        def run():
            try:
                function(*args)
            except OSError as exc:
                self.write_error = exc
        self.side_greenlets.append(gevent.spawn_later(delay, run))

    def _listen(self, start: float) -> None:
        """mod_event_socket's listener: read commands, reply, until the call is over."""
        first = self._next_command(self.options.connect_wait, "no connect within "
                                   f"{self.options.connect_wait}s (FreeSWITCH gives up)")
        if first is None:
            return
        if first.name != "connect":
            self._end("protocol_error", f"first command was {first.line!r}, not connect: "
                                        "FreeSWITCH swallows its reply and the client hangs")
        self.result.first_byte_ms = (time.monotonic() - start) * 1000
        self.connected = True
        self.result.commands.append(first.line)
        self._write(protocol.connect_reply_frame(self._channel_data(), self.options.socket_mode,
                                                 self.options.control))
        while True:
            command = self._next_command(None, "")
            if command is None:
                return
            self.result.commands.append(describe(command))
            self._on_command(command)

    def _next_command(self, timeout: float | None, timeout_detail: str) -> Command | None:
        """The next command; None once the gateway has closed after our disconnect notice.

        After the notice FreeSWITCH reads nothing more; we keep reading only to see the gateway
        close its side, which must happen promptly.
        """
        pending = self._pending
        while not pending or self.finished.is_set():
            wait = self.options.close_grace if self.finished.is_set() else timeout
            if wait is None:   # most reads: no Timeout object to make and cancel
                data = self.sock.recv(65536)
            else:
                data = None
                with gevent.Timeout(wait, False):
                    data = self.sock.recv(65536)
            if data is None:
                if self.finished.is_set():
                    self._end("timeout", "the gateway kept the socket open "
                                         f"{self.options.close_grace}s after the disconnect notice")
                self._end("timeout", timeout_detail)
            if not data:
                self._peer_closed()
                return None
            if not self.finished.is_set():
                pending.extend(self.parser.feed(data))
        return pending.pop(0)

    def _peer_closed(self) -> None:
        if self.write_error is not None:
            self._end("reset", f"write failed: {self.write_error}")
        if self.hungup.is_set():
            self._end("completed", "gateway closed after the hangup")
        if self.finished.is_set():
            self._end("early_close", "gateway sent exit while the call was up")
        self._end("early_close", "gateway closed while the call was up; the dialplan moves on")

    # -- commands ---------------------------------------------------------------------------

    def _on_command(self, command: Command) -> None:
        name, args = command.name, command.args
        full_only = ("linger", "nolinger", "event", "nixevent", "noevents", "api", "bgapi",
                     "log", "nolog", "sendevent")
        if self.options.control != "full" and name in full_only:
            self._reply("-ERR command not found")
        elif name == "myevents":
            if "myevents" in self.subscribed:
                self._reply("-ERR aready enabled.")
                return
            self.subscribed.add("myevents")
            self.event_format = "json" if "json" in args else "xml" if "xml" in args else "plain"
            self._reply("+OK Events Enabled")
            if self.options.socket_mode == "async" and not self.hungup.is_set():
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
        elif name == "sendmsg":
            self._on_sendmsg(command)
        elif name == "api":
            self._write(protocol.api_response_frame(self._api(args).encode()))
        elif name == "bgapi":
            job_uuid = command.headers.get("Job-UUID") or str(uuidlib.uuid4())
            self._reply(f"+OK Job-UUID: {job_uuid}", [("Job-UUID", job_uuid)])
            if {"BACKGROUND_JOB", "ALL"} & self.subscribed:
                self._emit("BACKGROUND_JOB", [("Job-UUID", job_uuid),
                                              ("Job-Owner-UUID", self.uuid),
                                              ("Job-Command", args.split(" ")[0])],
                           body=self._api(args).encode(), channel=False)
        elif name == "getvar":
            self._reply("-ERR command not found")
        elif name in ("filter", "nixevent", "noevents", "divert_events", "resume", "log",
                      "nolog"):
            self._reply("+OK")
        elif name == "exit":
            self._reply("+OK bye")
            self._disconnect()
        elif name == "connect":
            self._write(protocol.connect_reply_frame(self._channel_data(),
                                                     self.options.socket_mode,
                                                     self.options.control))
        else:
            self._reply("-ERR command not found")

    def _on_sendmsg(self, command: Command) -> None:
        headers = command.headers
        call_command = (headers.get("call-command") or "").lower()
        target = command.args.strip()
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
            if not self.hungup.is_set():
                self.apps.put((app, arg or "", headers.get("Event-UUID")))
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

    def _channel_loop(self) -> None:
        """Async sockets: the parked channel runs queued applications in order."""
        while True:
            app, arg, event_uuid = self.apps.get()
            if not self.hungup.is_set():   # FreeSWITCH runs no queued app after hangup
                self._run_app(app, arg, event_uuid)

    def _run_app_inline(self, app: str, arg: str, event_uuid: str | None) -> None:
        """Static sockets: the app runs in the session thread before the reply, and the events
        it raised are written only after that reply (docs/esl-protocol.md §7)."""
        self.held = []
        self._run_app(app, arg, event_uuid)
        self._reply("+OK")
        held, self.held = self.held, None
        for frame in held:
            self._write(frame)
        if self.hungup.is_set():
            self._announce_static_hangup()

    def _run_app(self, app: str, arg: str, event_uuid: str | None) -> None:
        """One application: CHANNEL_EXECUTE, its effect, CHANNEL_EXECUTE_COMPLETE."""
        self.running_app = (app, arg, event_uuid)
        app_headers = _app_headers(app, arg, event_uuid)
        self._emit("CHANNEL_EXECUTE", app_headers)
        response = "_none_"
        if app == "answer" and not self.answered:
            self.answered = True
            self._emit("CHANNEL_ANSWER")
        elif app == "playback":
            response = "FILE PLAYED"
            if self._play(self.options.playback_ms / 1000):
                return   # the hangup sequence reports the interrupted app
        elif app == "hangup":
            self.running_app = None
            self._hangup(arg or "NORMAL_CLEARING")
            return
        self.running_app = None
        self._emit("CHANNEL_EXECUTE_COMPLETE", app_headers + [("Application-Response", response)])

    def _play(self, seconds: float) -> bool:
        """Let a playback run (with a DTMF now and then, if asked); True if the call hung up."""
        interval = self.options.event_interval
        end = time.monotonic() + seconds
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return False
            if self.hungup.wait(left if interval is None else min(left, interval)):
                return True
            if interval is not None and end - time.monotonic() > 0:
                self._emit("DTMF", [("DTMF-Digit", "1"), ("DTMF-Duration", "2000")])

    def _hangup(self, cause: str) -> None:
        """The channel goes down: the hangup events, the linger, the disconnect notice."""
        if self.hungup.is_set():
            return
        self.hangup_cause = self.result.hangup_cause = cause
        self.hungup.set()
        if self.finished.is_set():
            return
        if not self.connected or self.linger is None:
            # Without linger the listener stops at once: events after this pass are lost.
            if self.connected:
                self._emit("CHANNEL_HANGUP", [("Hangup-Cause", cause)])
            self._disconnect()
            return
        if self.options.socket_mode == "static":
            if self.held is None:   # else the listener announces it after the app's reply
                self._announce_static_hangup()
            return
        self._emit("CHANNEL_HANGUP", [("Hangup-Cause", cause)])
        if self.running_app is not None:
            self._emit("CHANNEL_EXECUTE_COMPLETE", _app_headers(*self.running_app) +
                       [("Application-Response", "FILE NOT FOUND")])
        self._emit("CHANNEL_UNPARK")
        self._emit("CHANNEL_EXECUTE_COMPLETE", [("Application", "socket")])
        self._emit("CHANNEL_STATE", [("Channel-State", "CS_HANGUP")])
        self._emit("CHANNEL_HANGUP_COMPLETE", [("Hangup-Cause", cause),
                                               ("variable_billsec", "0")])
        self._linger_then_disconnect()

    def _announce_static_hangup(self) -> None:
        """Static sockets: the linger notice comes before CHANNEL_HANGUP, and no later hangup
        event (CHANNEL_STATE, CHANNEL_HANGUP_COMPLETE) ever arrives (fixtures static_full*)."""
        if self.hangup_announced:
            return
        self.hangup_announced = True
        self._linger_then_disconnect()
        self._emit("CHANNEL_HANGUP", [("Hangup-Cause", self.hangup_cause)])

    def _linger_then_disconnect(self) -> None:
        self._write(protocol.linger_notice_frame(self.uuid, self._channel_name(), self.linger))
        linger = self.options.linger_cap if self.linger < 0 else min(self.linger,
                                                                      self.options.linger_cap)
        self._side(linger, self._disconnect)

    def _disconnect(self) -> None:
        """Send the disconnect notice and close our side; the gateway must then close promptly."""
        with self.write_lock:
            if self.finished.is_set():
                return
            self.finished.set()
            self._send(protocol.disconnect_notice_frame(self.uuid))
            self.sock.shutdown(socket.SHUT_WR)

    # -- writing ----------------------------------------------------------------------------

    def _reply(self, text: str, extra=()) -> None:
        self._write(protocol.reply_frame(text, extra))

    def _emit(self, name: str, extra=(), body: bytes = b"", channel: bool = True) -> None:
        if self.event_format is None or not ({name, "ALL"} & self.subscribed or
                                             (channel and "myevents" in self.subscribed)):
            return
        headers = [("Event-Name", name), ("Core-UUID", CORE_UUID),
                   ("Event-Date-Timestamp", str(int(time.time() * 1e6)))]
        if self.event_format == "plain":   # the channel's own headers serialised once a state
            if self._channel_block[0] != self.answered:
                self._channel_block = (self.answered, protocol.serialize_headers_plain(
                    self._channel_headers()))
            frame = protocol.event_frame_plain(
                protocol.serialize_headers_plain(headers) + self._channel_block[1]
                + protocol.serialize_headers_plain(extra), body)
        else:
            frame = protocol.event_frame([*headers, *self._channel_headers(), *extra], body,
                                         self.event_format)
        if self.held is not None:
            self.held.append(frame)
        else:
            self._write(frame)

    def _write(self, data: bytes) -> None:
        with self.write_lock:
            if not self.finished.is_set():   # nothing follows the disconnect notice
                self._send(data)

    def _send(self, data: bytes) -> None:
        """Plain send() in a loop: gevent's sendall asks the kernel for the buffer size first,
        every time (a syscall per frame in a load generator that is short of CPU)."""
        while data:
            data = data[self.sock.send(data):]

    def _record(self, outcome: str, detail: str) -> None:
        """The first outcome recorded is the call's outcome."""
        if not self.result.outcome:
            self.result.outcome, self.result.detail = outcome, detail

    def _end(self, outcome: str, detail: str) -> None:
        self._record(outcome, detail)
        raise _CallEnded()

    # -- channel data -----------------------------------------------------------------------

    def _channel_name(self) -> str:
        return "loopback/9090-b"

    def _channel_headers(self) -> list[tuple[str, str]]:
        return [("Unique-ID", self.uuid), ("Channel-Name", self._channel_name()),
                ("Channel-State", "CS_EXECUTE"),
                ("Answer-State", "answered" if self.answered else "ringing"),
                ("Caller-Caller-ID-Name", "Simulated Caller"),
                ("Caller-Caller-ID-Number", "0000000000"),
                ("Caller-Destination-Number", "9090"), ("Caller-Context", "default")]

    def _channel_data(self) -> list[tuple[str, str]]:
        return [("Event-Name", "CHANNEL_DATA"), ("Core-UUID", CORE_UUID),
                ("FreeSWITCH-Hostname", "simulator"),
                ("Event-Date-Local", time.strftime("%Y-%m-%d %H:%M:%S")),
                *self._channel_headers(), ("Channel-Call-State", "RINGING"),
                ("variable_uuid", self.uuid), ("variable_socket_host", self.address[0]),
                ("variable_current_application", "socket")]


def _app_headers(app: str, arg: str, event_uuid: str | None) -> list[tuple[str, str]]:
    """The headers naming an application in CHANNEL_EXECUTE and CHANNEL_EXECUTE_COMPLETE."""
    headers = [("Application", app), ("Application-Data", arg)]
    if event_uuid:
        headers.append(("Application-UUID", event_uuid))
    return headers


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


def _dial(address: tuple[str, int], timeout: float):
    """Connect as FreeSWITCH does, to a literal address without a resolver round trip (gevent's
    create_connection resolves in a thread pool on every call: a sixth of the generator's CPU)."""
    family = _address_family(address[0])
    if family is None:
        return gsocket.create_connection(address, timeout=timeout)
    sock = gsocket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def run_load(address: tuple[str, int], calls: int, rate: float | None = None,
             concurrency: int | None = None, options: CallOptions | None = None,
             seed: int | None = None, on_result=None) -> LoadResult:
    """Offer ``calls`` calls, open loop at ``rate`` calls/s and/or at most ``concurrency`` at once.

    ``on_result(result)`` is called as each call ends (for live progress).
    """
    options = options or CallOptions()
    rng = random.Random(seed)
    group = Pool(concurrency) if concurrency else Pool()
    results: list[CallResult] = []

    def one(call: SimulatedCall) -> None:
        result = call.run()
        results.append(result)
        if on_result is not None:
            on_result(result)

    start = time.monotonic()
    for index in range(calls):
        if rate:
            delay = start + index / rate - time.monotonic()
            if delay > 0:
                gevent.sleep(delay)
        group.spawn(one, SimulatedCall(address, options, random.Random(rng.random())))
    group.join()
    return LoadResult(results, time.monotonic() - start)
