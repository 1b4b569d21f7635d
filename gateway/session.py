"""One outbound ESL call over one socket: the whole API a call-control handler sees.

Design rules, each learnt from a peer library's production bug (docs/esl-peers.md):

* One reader, a callback of the event loop, owns the socket's receive side and is the only one
  that feeds the parser.
  Teardown has one owner too (``_shutdown``): it fails every waiter, wakes every consumer and closes
  the socket; nothing is ever sent into a structure that another greenlet may have torn down
  (eslgo's "send on closed channel" crash).
* Replies carry no correlation id, so commands are written and their reply slots queued under one
  lock, and replies are matched strictly FIFO. A reply that does not come in time closes the call:
  letting the next command read a stale reply would desynchronise everything after it.
* Events reach the handler in arrival order through one bounded queue; the reader never blocks on
  the handler (FreeSWITCH kills a listener that stops draining), and overflow ends only this call.
* CHANNEL_HANGUP, the linger notice, the disconnect notice and EOF each wake every waiter at once:
  FreeSWITCH runs no queued app after a hangup, so waiting for its completion would wait for ever.
"""

from __future__ import annotations

import logging
import os
import random
import re
import socket
import time
from collections import deque

import gevent
from gevent.event import AsyncResult
from gevent.event import Event as Flag
from gevent.hub import Waiter, get_hub
from gevent.lock import Semaphore
from gevent.socket import wait_write

from gateway import protocol
from gateway.logsafe import loggable
from gateway.protocol import Event, Frame, ProtocolError, as_text

log = logging.getLogger("esl_gateway.session")

# What a Unique-ID may look like (FreeSWITCH's are UUIDs): it goes into every log line of the
# call and into commands, so one with a control character or a space is a protocol error.
_USABLE_UUID = re.compile(r"[!-~]{1,256}")

# Closing the socket within ~1 ms of the connect reply leaves the call parked for ever inside
# FreeSWITCH (docs/esl-protocol.md §14; eslgo waits 25 ms for the same reason). A call that is
# still up is never closed sooner than this after its connect reply.
CONNECT_SETTLE_SECONDS = 0.025
# We close by half-closing (FIN) and reading until FreeSWITCH closes too: closing with its last
# bytes unread would answer them with a reset. This bounds that wait.
CLOSE_DRAIN_SECONDS = 5.0
RECV_SIZE = 65536
# Every session of the worker reads into this one buffer: the framer takes what it needs of a
# read before anything else runs (the rest of a frame it copies), so no read allocates 64 KiB
# and gives most of it back. One thread runs the hub, so no two reads overlap.
_received = bytearray(RECV_SIZE)
_received_view = memoryview(_received)
_CLOSED = object()   # queue sentinel: no event will ever follow
# Event-UUID and Job-UUID only need to be unique, not secret: a PRNG seeded once per process
# (after fork) avoids a getrandom() syscall per execute.
_uuid_bits = random.Random()
os.register_at_fork(after_in_child=_uuid_bits.seed)


_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))   # version and variant bits
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


def new_uuid() -> str:
    """A random (version 4) UUID, formatted directly: uuid.UUID costs more than the call path
    can spare for two per call."""
    text = "%032x" % (_uuid_bits.getrandbits(128) & _UUID4_CLEAR | _UUID4_SET)
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


class ESLError(Exception):
    """Base of every error a handler can see; says which call, which command, what FreeSWITCH said."""

    def __init__(self, message: str, *, uuid: str | None = None, command: str | None = None,
                 reply: str | None = None):
        super().__init__(message)
        self.uuid, self.command, self.reply = uuid, command, reply

    def __str__(self) -> str:
        text = super().__str__()
        if self.command:
            text = f"{self.command!r}: {text}"
        if self.reply is not None:
            text = f"{text} (FreeSWITCH said {self.reply.strip()!r})"
        return f"[{self.uuid or 'no uuid yet'}] {text}"


class SessionClosed(ESLError):
    """The connection to FreeSWITCH is gone (disconnect notice, EOF, error or close())."""


class CallHungUp(SessionClosed):
    """The channel hung up: no application will run any more, though final events may follow."""


class CommandError(ESLError):
    """FreeSWITCH answered a command with -ERR."""


class ApiError(CommandError):
    """An api/bgapi command's output starts with -ERR."""


class CommandTimeout(ESLError):
    """No reply came in time; the call was closed so no later command can read a stale reply."""


class HandshakeTimeout(CommandTimeout):
    """The peer never answered ``connect`` (a port scanner, a health check, an inbound-ESL
    client): closed, and not logged here; the worker counts and logs these at a limited rate."""


class NotFullControl(CommandError):
    """The command needs a ``full`` socket; FreeSWITCH would only answer -ERR command not found."""


class WaitTimeout(ESLError):
    """An event, execute completion or background job did not arrive in time (the call goes on)."""


# Channel states of a channel that has hung up (switch_types.h: CS_HANGUP and after).
DOWN_STATES = frozenset(("CS_HANGUP", "CS_REPORTING", "CS_DESTROY"))

# Without the `full` keyword FreeSWITCH refuses these with "-ERR command not found"
# (mod_event_socket.c, the full-only gate after sendmsg; docs/esl-protocol.md §5).
FULL_ONLY = frozenset(("linger", "nolinger", "event", "nixevent", "noevents", "api", "bgapi",
                       "log", "nolog", "sendevent"))


class SessionSettings:
    """The per-call knobs, taken from the gateway config once per worker."""

    __slots__ = ("command_timeout", "wait_timeout", "linger", "max_frame_size",
                 "max_queued_events", "handshake_timeout", "frame_timeout", "limits")

    def __init__(self, command_timeout: float = 30.0, wait_timeout: float = 3600.0,
                 linger: int = 10, max_frame_size: int = protocol.DEFAULT_MAX_FRAME_SIZE,
                 max_queued_events: int = 5000, handshake_timeout: float = 10.0,
                 frame_timeout: float = 10.0,
                 max_header_block: int = protocol.DEFAULT_MAX_HEADER_BLOCK,
                 max_headers: int = protocol.DEFAULT_MAX_HEADERS,
                 max_line_length: int = protocol.DEFAULT_MAX_LINE_LENGTH):
        self.command_timeout = command_timeout
        self.wait_timeout = wait_timeout
        self.linger = linger
        self.max_frame_size = max_frame_size
        self.max_queued_events = max_queued_events
        self.handshake_timeout = handshake_timeout
        self.frame_timeout = frame_timeout   # 0: no deadline for a frame begun
        # The header-block bounds, as the parser takes them.
        self.limits = {"max_header_block": max_header_block, "max_headers": max_headers,
                       "max_line_length": max_line_length}


class Counters:
    """Per-worker call-path counters, bumped in place and shipped to the master in batches."""

    __slots__ = ("events", "commands", "protocol_errors")

    def __init__(self):
        self.events = self.commands = self.protocol_errors = 0


class BackgroundJob:
    """A ``bgapi`` in flight, resolved by the BACKGROUND_JOB event that carries our Job-UUID."""

    def __init__(self, session: "Session", job_uuid: str, command: str, result: AsyncResult):
        self.session, self.uuid, self.command, self._result = session, job_uuid, command, result

    def ready(self) -> bool:
        return self._result.ready()

    def get(self, timeout: float | None = None) -> str:
        """The job's output; raises ApiError for -ERR output, WaitTimeout, or SessionClosed."""
        if timeout is None:
            timeout = self.session.settings.wait_timeout
        event = self.session._await(self.session._jobs, self.uuid, self._result, timeout,
                                    f"bgapi {self.command}", "no BACKGROUND_JOB")
        output = event.body_text()
        if output.startswith("-ERR"):
            raise ApiError("background job failed", uuid=self.session.uuid,
                           command=f"bgapi {self.command}", reply=output)
        return output


_TIMED_OUT = object()


class _Reply(Waiter):
    """Where one command's reply, or one execute's completion, lands (one waiter only).

    A gevent Waiter and a loop timer rather than AsyncResult and Timeout: the reader runs in the
    hub, so it switches straight into the waiting handler, with no link bookkeeping, no extra
    callback hop and no exception object per wait (eight waits per IVR call add up). A Waiter
    itself, not one kept inside: one object less and one call less per command.
    """

    __slots__ = ()

    # From the reader (in the hub) only.
    set = Waiter.switch

    def set_exception(self, error: Exception) -> None:
        """From anywhere: the waiter is woken from the hub."""
        get_hub().loop.run_callback(self.throw, error)

    def get(self, timeout: float):
        """The reply (or completion event); raises gevent.Timeout as AsyncResult.get does."""
        timer = get_hub().loop.timer(timeout)
        timer.start(self.switch, _TIMED_OUT)
        try:
            value = Waiter.get(self)
        finally:
            timer.close()
        if value is _TIMED_OUT:
            raise gevent.Timeout(timeout)
        return value


class Session:
    """The handler's view of one call. Created by the worker for each accepted connection."""

    # Thousands of these live at once in a worker: no per-instance __dict__.
    __slots__ = ("settings", "counters", "uuid", "channel", "socket_mode", "control", "hungup",
                 "hangup_cause", "close_reason", "_sock", "_parser", "_write_lock", "_pending",
                 "_executes", "_jobs", "_events", "_event_ready", "_closed", "_connected_at",
                 "_event_format", "_background_jobs_subscribed", "_watcher", "_drain_timer",
                 "_hangup_flag", "resumed", "_resync", "_frame_timer", "__weakref__")

    def __init__(self, sock, settings: SessionSettings | None = None,
                 counters: Counters | None = None):
        self.settings = settings or SessionSettings()
        self.counters = counters or Counters()
        self.uuid: str | None = None
        self.channel: protocol.Headers | None = None
        self.socket_mode: str | None = None   # "async" or "static"
        self.control: str | None = None       # "full" or "single-channel"
        self.hungup = False
        self.hangup_cause: str | None = None
        self.close_reason: str | None = None
        self._sock = sock
        self._parser = protocol.SessionParser(self.settings.max_frame_size,
                                              **self.settings.limits)
        self._write_lock = Semaphore()
        self._pending: deque[tuple[_Reply, str]] = deque()
        self._executes: dict[str, tuple[_Reply, str]] = {}
        self._jobs: dict[str, tuple[AsyncResult, str]] = {}
        # A deque and a flag rather than gevent's Queue (2.7 KB each): one per held call.
        self._events: deque = deque()
        self._event_ready = Flag()   # set while _events is not empty
        self._closed = Flag()
        self._connected_at = 0.0
        self._event_format: str | None = None   # set once events are subscribed
        self._background_jobs_subscribed = False
        self._watcher = None       # the socket's read watcher, from start() until released
        self._drain_timer = None   # bounds the wait for FreeSWITCH's close after ours
        self._hangup_flag = None   # made by the first wait_hungup(): most calls never need one
        self.resumed = False       # True for a call taken over from a worker that died
        self._resync = None        # while reattaching: (marker, bytes read so far, waiter)
        self._frame_timer = None   # runs while a frame is begun but not complete

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Send ``connect`` (FreeSWITCH says nothing until we do) and decode CHANNEL_DATA.

        A peer that does not answer within the handshake timeout raises HandshakeTimeout.
        """
        self._start_reading()
        self._connect(self.settings.handshake_timeout, HandshakeTimeout)

    def reattach(self, timeout: float | None = None) -> None:
        """Take over a call that another worker was serving when it died, mid-conversation.

        The byte stream may be anywhere: the rest of a frame the dead worker had half read,
        replies and events in flight. So the stream is realigned on a marker only we can
        produce: ``sendmsg <a fresh uuid>`` is answered ``-ERR invalid session id [<uuid>]``,
        with no effect on the call, in full and single-channel sockets alike. Everything before
        the end of that reply is dropped; what follows is whole frames. Sent first: two line
        breaks, which end any command the dead worker might have half written (its commands are
        one send() each, so that is rare; FreeSWITCH answers it before our marker), and
        ``connect``, because the dead worker may have died before it sent its own, and
        FreeSWITCH never answers a first command other than connect (a connect more is harmless:
        a second connect on a live socket just returns a fresh CHANNEL_DATA). Then ``connect``
        once more gives the channel's state now, read in step. FreeSWITCH's own state for the
        socket (event subscriptions, filters, linger) is kept; the caller of reattach restores
        what the session must know of it.
        """
        self.resumed = True
        self._start_reading()
        token = new_uuid()
        waiter = _Reply()
        self._resync = (f"[{token}]\n\n".encode(), bytearray(), waiter)
        with self._write_lock:
            try:
                self._send_all(b"\n\n" + protocol.connect() + protocol.sendmsg([], uuid=token))
            except OSError as exc:
                self._shutdown(f"send failed: {exc}")
        timeout = self.settings.command_timeout if timeout is None else timeout
        try:
            waiter.get(timeout)
        except gevent.Timeout:
            self._shutdown(f"FreeSWITCH did not answer the resynchronisation within {timeout}s")
            raise CommandTimeout("no reply to the resynchronisation", uuid=self.uuid,
                                 command="sendmsg <marker>") from None
        self._connect()

    def detach(self, reason: str) -> None:
        """Let go of the call without ending it: stop reading and close our descriptor, but
        send no FIN. The master's copy of the socket keeps the connection up for the worker
        that takes the call over (see reattach). Waiters wake with SessionClosed."""
        self._stop_reading()
        self._teardown(reason)
        self._sock.close()

    def release(self) -> bytes:
        """Stop being the call's session but keep its connection, for proxy mode, which relays
        the socket's bytes from here on. Returns what FreeSWITCH sent that was read but not
        parsed (the relay passes it on first)."""
        self._stop_reading()
        self._teardown("handed to the proxy's relay")
        return self._parser.buffered()

    def _start_reading(self) -> None:
        # Reads happen only when the loop says the socket is readable, so they must never wait.
        self._sock.setblocking(False)
        self._watcher = get_hub().loop.io(self._sock.fileno(), 1)
        self._watcher.start(self._on_readable)

    def _stop_reading(self) -> bool:
        """Close the read watcher; False if nothing was reading."""
        if self._watcher is None:
            return False
        self._watcher.close()
        self._watcher = None
        return True

    @property
    def has_events(self) -> bool:
        """True once this channel's events are subscribed (execute can wait for completions)."""
        return self._event_format is not None

    def ensure_events(self) -> None:
        """Subscribe to this channel's events unless the socket already is: a resumed call's
        dead worker may have subscribed (FreeSWITCH then answers -ERR aready enabled, and keeps
        the format it had; the parser reads every format)."""
        try:
            self.myevents()
        except CommandError as exc:
            if not (exc.reply or "").startswith("-ERR aready enabled"):
                raise
            self._event_format = "plain"

    def _connect(self, timeout: float | None = None, timeout_error: type = CommandTimeout
                 ) -> None:
        reply = self._command(protocol.connect(), "connect", timeout, timeout_error)
        if not reply.reply_text.startswith("+OK"):
            self._shutdown("connect refused")
            raise CommandError("connect was refused", command="connect", reply=reply.reply_text)
        channel = reply.headers
        uuid = channel.get("Unique-ID")
        if uuid is not None and (uuid.__class__ is not str or not _USABLE_UUID.fullmatch(uuid)):
            gevent.sleep(CONNECT_SETTLE_SECONDS)   # closing sooner could park the call for ever
            if not self._closed.is_set():   # else what closed it meanwhile was logged: once
                self._protocol_error(
                    f"the connect reply's Unique-ID is unusable: {loggable(uuid)}")
            raise SessionClosed(self.close_reason, command="connect")
        self._connected_at = time.monotonic()
        self.channel = channel
        self.uuid = uuid
        self.socket_mode = as_text(channel.get("Socket-Mode"))
        self.control = as_text(channel.get("Control"))
        if self.resumed and (channel.get("Answer-State") == "hangup" or
                             as_text(channel.get("Channel-State")) in DOWN_STATES):
            self.hungup = True   # it went down while no worker served it
            self.hangup_cause = as_text(channel.get("Hangup-Cause"))

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self, reason: str = "closed by the handler") -> None:
        """Close the connection; FreeSWITCH's ``socket`` app returns and the dialplan goes on.

        A call that is still up is given the connect round-trip's settle time first (see
        CONNECT_SETTLE_SECONDS). Idempotent.
        """
        if self._closed.is_set():
            return
        if not self.hungup and self._connected_at:
            remaining = CONNECT_SETTLE_SECONDS - (time.monotonic() - self._connected_at)
            if remaining > 0:
                gevent.sleep(remaining)
        self._shutdown(reason)

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Wait until FreeSWITCH (or anyone) closes the connection; False on timeout."""
        return self._closed.wait(timeout)

    def wait_hungup(self, timeout: float | None = None) -> bool:
        """Wait until the channel has hung up (CHANNEL_HANGUP, the linger notice) or the
        connection is gone; False on timeout. Needs no event subscription on ``full`` sockets,
        where the worker's linger makes FreeSWITCH announce the hangup."""
        if self.hungup or self._closed.is_set():
            return True
        if self._hangup_flag is None:
            self._hangup_flag = Flag()
        return self._hangup_flag.wait(timeout)

    # -- events -----------------------------------------------------------------------------

    def next_event(self, timeout: float | None = None) -> Event | None:
        """The next event in arrival order; None on timeout; SessionClosed once none can follow.

        Events that arrived before the connection closed are still delivered first.
        """
        events = self._events
        if not events:
            deadline = None if timeout is None else time.monotonic() + timeout
            while not events:
                left = None if deadline is None else deadline - time.monotonic()
                if (left is not None and left <= 0) or not _wait_flag(self._event_ready, left):
                    return None
        item = events[0]
        if item is _CLOSED:   # stays queued: every later consumer is told too
            raise SessionClosed(f"no more events: {self.close_reason}", uuid=self.uuid)
        events.popleft()
        if not events:
            self._event_ready.clear()
        return item

    def wait_for(self, name: str, timeout: float | None = None) -> Event:
        """Consume events until one named ``name`` (e.g. CHANNEL_HANGUP_COMPLETE) arrives.

        Events before it are consumed too. Raises WaitTimeout (default: the configured wait
        timeout), or SessionClosed when the call ends without it.
        """
        if timeout is None:
            timeout = self.settings.wait_timeout
        deadline = time.monotonic() + timeout
        events = self._events
        while True:
            event = self.next_event(max(deadline - time.monotonic(), 0) if not events else 0)
            if event is None:
                raise WaitTimeout(f"no {name} within {timeout}s", uuid=self.uuid)
            if event.name == name:
                return event

    def wait_end(self, timeout: float | None = None) -> Event | None:
        """Wait until the call is over, as far as this socket mode lets us see it.

        Async sockets get CHANNEL_HANGUP_COMPLETE (with linger); static sockets never do, their
        last hangup event is CHANNEL_HANGUP (captures static_full*). Returns that event, or None
        when the connection ended first (no linger, or single-channel control).
        """
        final = "CHANNEL_HANGUP_COMPLETE" if self.socket_mode == "async" else "CHANNEL_HANGUP"
        try:
            return self.wait_for(final, timeout)
        except SessionClosed:
            return None

    def __iter__(self):
        """Every event, in order, until the call's connection is gone."""
        while True:
            try:
                yield self.next_event()
            except SessionClosed:
                return

    # -- commands ---------------------------------------------------------------------------

    @property
    def full(self) -> bool:
        """True when the dialplan said ``full``: api, bgapi, linger and event work only then."""
        return self.control == "full"

    def myevents(self, fmt: str = "plain") -> str:
        """Subscribe to this channel's events (json is lossless, plain is what most tools use)."""
        text = self._checked(protocol.myevents(fmt), f"myevents {fmt}")
        self._event_format = fmt
        return text

    def events(self, *names: str, fmt: str | None = None) -> str:
        """``event <fmt> <names>``: more event types (e.g. CUSTOM subclasses, ALL).

        FreeSWITCH switches the format of every event on the socket, so the current one is kept
        unless ``fmt`` says otherwise.
        """
        fmt = fmt or self._event_format or "plain"
        text = self._checked(protocol.event(fmt, names), f"event {fmt} {' '.join(names)}")
        self._event_format = fmt
        if "BACKGROUND_JOB" in names or "ALL" in names:
            self._background_jobs_subscribed = True
        return text

    def nixevent(self, *names: str) -> str:
        return self._checked(protocol.nixevent(names), f"nixevent {' '.join(names)}")

    def noevents(self) -> str:
        text = self._checked(protocol.noevents(), "noevents")
        self._event_format = None
        self._background_jobs_subscribed = False
        return text

    def filter(self, header: str, value: str) -> str:
        """Once any filter exists, events lacking every filtered header are dropped (so a
        ``Unique-ID`` filter also drops BACKGROUND_JOB)."""
        return self._checked(protocol.filter_add(header, value), f"filter {header} {value}")

    def filter_delete(self, header: str, value: str | None = None) -> str:
        return self._checked(protocol.filter_delete(header, value), f"filter delete {header}")

    def divert_events(self, on: bool = True) -> str:
        return self._checked(protocol.divert_events(on), f"divert_events {on}")

    def linger(self, seconds: int | None = None) -> str:
        """Keep the socket after hangup so final events (CHANNEL_HANGUP_COMPLETE) arrive.

        Always finite: without an argument, the configured linger time is sent. The worker does
        this for every ``full`` call before the handler runs.
        """
        seconds = self.settings.linger if seconds is None else seconds
        return self._checked(protocol.linger(seconds), f"linger {seconds}")

    def nolinger(self) -> str:
        return self._checked(protocol.nolinger(), "nolinger")

    def log(self, level: str | int = "debug") -> str:
        """Stream this call's log lines; they arrive as events named ``LOG``, the line as body."""
        return self._checked(protocol.log(level), f"log {level}")

    def nolog(self) -> str:
        return self._checked(protocol.nolog(), "nolog")

    def resume(self) -> str:
        """When the socket closes, let the dialplan resume instead of ending the socket app."""
        return self._checked(protocol.resume(), "resume")

    def exit(self) -> None:
        """Ask FreeSWITCH to end this socket (its disconnect notice then closes the session)."""
        self._checked(protocol.exit_(), "exit")

    def execute(self, app: str, arg: str | None = None, wait: bool = True,
                timeout: float | None = None, **options) -> Event | str:
        """Run a dialplan application on this channel.

        With ``wait`` the CHANNEL_EXECUTE_COMPLETE whose Application-UUID is our Event-UUID is
        returned (never matched by app name: two queued playbacks are otherwise ambiguous),
        within ``timeout`` (default: the configured wait timeout). Without it, the Event-UUID is
        returned once FreeSWITCH has accepted the app. Options: ``loops``, ``event_lock``,
        ``async_``. On a static socket FreeSWITCH replies only once the app has run, so the
        reply is awaited as long as the app may take, not the command timeout.
        """
        command = f"execute {app}"
        if self.hungup:
            raise CallHungUp("the call has hung up", uuid=self.uuid, command=command)
        if wait and self._event_format is None:
            raise ESLError("waiting for an execute needs events: call session.myevents() first",
                           uuid=self.uuid, command=command)
        timeout = self.settings.wait_timeout if timeout is None else timeout
        runs_inline = self.socket_mode == "static" and not options.get("async_")
        event_uuid = new_uuid()
        result = _Reply()
        if wait:
            self._executes[event_uuid] = (result, command)
        try:
            self._checked(protocol.execute(app, arg, event_uuid=event_uuid, **options), command,
                          timeout if runs_inline else None)
        except BaseException:
            self._executes.pop(event_uuid, None)
            raise
        if not wait:
            return event_uuid
        return self._await(self._executes, event_uuid, result, timeout, command, "not complete")

    def answer(self) -> Event:
        return self.execute("answer")

    def playback(self, path: str, **kwargs) -> Event:
        return self.execute("playback", path, **kwargs)

    def hangup(self, cause: str = "NORMAL_CLEARING") -> None:
        """Hang the call up. A call that is already down or disconnected is left as it is."""
        if self.hungup or self.closed:
            return
        self._checked(protocol.hangup(cause), f"hangup {cause}")

    def sendmsg(self, headers: list[tuple[str, str]], uuid: str | None = None,
                body: str | bytes | None = None) -> str:
        """A raw ``sendmsg``, to this channel or another ``uuid`` (e.g. the B leg)."""
        return self._checked(protocol.sendmsg(headers, uuid=uuid, body=body),
                             f"sendmsg {uuid or self.uuid}")

    def api(self, cmd: str, timeout: float | None = None) -> str:
        """Run an API command inline (``full`` sockets only); -ERR output raises ApiError.

        FreeSWITCH runs it in the listener thread, so a slow one delays this call's events.
        """
        frame = self._command(protocol.api(cmd), f"api {cmd}", timeout)
        output = frame.body_text()
        if output.startswith("-ERR"):
            raise ApiError("api command failed", uuid=self.uuid, command=f"api {cmd}",
                           reply=output)
        return output

    def bgapi(self, cmd: str) -> BackgroundJob:
        """Start an API command in the background; ``.get()`` the returned job for its output.

        BACKGROUND_JOB is subscribed the first time, in the socket's current event format
        (``event <fmt>`` switches the format of every event on the socket).
        """
        if not self._background_jobs_subscribed:
            self.events("BACKGROUND_JOB")
        job_uuid = new_uuid()
        result = AsyncResult()
        self._jobs[job_uuid] = (result, f"bgapi {cmd}")
        try:
            self._checked(protocol.bgapi(cmd, job_uuid), f"bgapi {cmd}")
        except BaseException:
            self._jobs.pop(job_uuid, None)
            raise
        return BackgroundJob(self, job_uuid, cmd, result)

    def getvar(self, name: str) -> str | None:
        """A channel variable, or None when unset (FreeSWITCH answers -ERR command not found).

        FreeSWITCH truncates values to 511 bytes here; read long values from ``channel``.
        """
        text = self._command(protocol.getvar(name), f"getvar {name}").reply_text
        return None if text == "-ERR command not found" else text

    def send(self, data: bytes, description: str, timeout: float | None = None) -> Frame:
        """Send a pre-serialised command (see gateway.protocol) and return its reply frame."""
        return self._command(data, description, timeout)

    # -- internals --------------------------------------------------------------------------

    def _await(self, waiters: dict, key: str, result: AsyncResult | _Reply, timeout: float,
               command: str, missing: str) -> Event:
        """Wait for an execute's completion or a job's result; on timeout forget the waiter."""
        try:
            return result.get(timeout)
        except gevent.Timeout:
            waiters.pop(key, None)
            raise WaitTimeout(f"{missing} within {timeout}s", uuid=self.uuid,
                              command=command) from None

    def _checked(self, data: bytes, description: str, timeout: float | None = None) -> str:
        text = self._command(data, description, timeout).reply_text
        if text.startswith("-ERR"):
            raise CommandError("command failed", uuid=self.uuid, command=description, reply=text)
        return text

    def _command(self, data: bytes, description: str, timeout: float | None = None,
                 timeout_error: type = CommandTimeout) -> Frame:
        """Send a command and wait for its reply; on timeout close the call and raise
        ``timeout_error`` (logged here unless it is a HandshakeTimeout)."""
        if self._closed.is_set():
            raise SessionClosed(self.close_reason or "closed", uuid=self.uuid,
                                command=description)
        if self.control is not None and self.control != "full" and \
                description.split(" ", 1)[0] in FULL_ONLY:
            raise NotFullControl(
                "FreeSWITCH refuses this without `full`: use "
                "`socket host:port async full` in the dialplan", uuid=self.uuid,
                command=description)
        slot = _Reply()
        with self._write_lock:
            # Queue the slot before writing: the reply may be read while a send yields.
            self._pending.append((slot, description))
            try:
                self._send_all(data)
            except OSError as exc:
                self._shutdown(f"send failed: {exc}")
        self.counters.commands += 1
        timeout = self.settings.command_timeout if timeout is None else timeout
        try:
            return slot.get(timeout)
        except gevent.Timeout:
            reason = f"no reply to {description!r} within {timeout}s"
            if timeout_error is not HandshakeTimeout:
                log.warning("[%s] %s; closing this call", self.uuid, reason)
            self._shutdown(reason)
            raise timeout_error(f"no reply within {timeout}s", uuid=self.uuid,
                                command=description) from None

    def _send_all(self, data: bytes) -> None:
        """Write a command. Commands are small: one plain send() nearly always takes it all
        (gevent's sendall asks the kernel for the buffer size on every call)."""
        sock = self._sock
        while data:
            try:
                data = data[sock.send(data):]
            except BlockingIOError:   # FreeSWITCH is not reading: wait, but not for ever
                wait_write(sock.fileno(), self.settings.command_timeout)

    def _on_readable(self) -> None:
        """The socket's only reader, run by the event loop whenever the socket is readable.

        A loop callback, not a reader greenlet per call: a held call costs one greenlet stack
        (about 8 KiB) less, and each chunk is parsed without a switch. It never blocks: the
        socket is non-blocking, and dispatching only resolves waiters and queues events.
        """
        try:
            size = self._sock.recv_into(_received)
        except BlockingIOError:
            return
        except OSError as exc:
            self._peer_gone(f"connection error: {exc}")
            return
        data = _received_view[:size]
        if not size:
            cut = " in the middle of a frame" if self._parser.mid_frame else ""
            self._peer_gone(f"FreeSWITCH closed the connection{cut}")
        elif self._resync is not None and not self._closed.is_set():
            self._realign(data)
        elif not self._closed.is_set():   # after our FIN, what FreeSWITCH still sends is dropped
            self._on_data(data)

    def _on_data(self, data: bytes) -> None:
        """Parse and dispatch what FreeSWITCH sent."""
        try:
            items = self._parser.feed(data)
            for item in items:
                # Shut down meanwhile (close(), a timeout, an overflow)? Then no frame may
                # reach the torn-down waiters and queue, not even the rest of this chunk.
                if self._closed.is_set():
                    return
                if item.__class__ is Event:   # a plain event, most of a call's frames
                    self._on_event(item)
                else:
                    self._dispatch(item)
            # Most reads end on a frame's end with no frame being timed: nothing to do then.
            if self.settings.frame_timeout and not self._closed.is_set() and (
                    self._frame_timer is not None or self._parser.mid_frame):
                self._time_frame(bool(items))
        except ProtocolError as exc:
            self._protocol_error(str(exc))
        except Exception:
            log.exception("[%s] internal error in the session reader; closing this call",
                          self.uuid)
            self._shutdown("internal error in the session reader")

    def _protocol_error(self, what: str) -> None:
        self.counters.protocol_errors += 1
        log.warning("[%s] protocol error from FreeSWITCH: %s; closing this call", self.uuid, what)
        self._shutdown(f"protocol error: {what}")

    def _time_frame(self, completed: bool) -> None:
        """Give a begun frame its deadline (--frame-timeout): a peer trickling a byte a second
        must not hold a call for ever. Each frame has its own, so a stream of frames whose
        every read ends mid-frame is never cut."""
        timer, mid_frame = self._frame_timer, self._parser.mid_frame
        if timer is not None and (completed or not mid_frame):
            # The frame timed so far is complete. (A new timer, not a restart: a libev timer
            # stopped and started again keeps its first deadline.)
            timer.close()
            timer = self._frame_timer = None
        if timer is None and mid_frame:
            self._frame_timer = get_hub().loop.timer(self.settings.frame_timeout)
            self._frame_timer.start(self._frame_overdue)

    def _frame_overdue(self) -> None:
        self._protocol_error(f"a frame was not complete within {self.settings.frame_timeout}s "
                             "(--frame-timeout)")

    def _realign(self, data: bytes) -> None:
        """While reattaching: drop bytes up to the end of the marker reply, then read on."""
        marker, seen, waiter = self._resync
        seen += data
        end = seen.find(marker)
        if end < 0:
            del seen[:-len(marker)]   # a marker split across reads is still found next time
            return
        self._resync = None
        rest = bytes(seen[end + len(marker):])
        if rest:   # whole frames from here: events, nothing that answers a command yet
            self._on_data(rest)
        waiter.set(None)

    def _peer_gone(self, reason: str) -> None:
        """FreeSWITCH's side is closed: release the socket at once (no FIN, no drain to wait
        for), then tear the session down if it was not already."""
        self._release()
        self._teardown(reason)

    def _release(self) -> None:
        """Stop reading and close the socket: FreeSWITCH has closed its side, or the drain
        after our FIN timed out."""
        if not self._stop_reading():
            return
        if self._drain_timer is not None:
            self._drain_timer.close()
        close_after_poll(self._sock)

    def _dispatch(self, frame: Frame) -> None:
        content_type = frame.content_type
        if content_type in protocol.EVENT_CONTENT_TYPES:
            self._on_event(protocol.parse_event(frame, self._parser.check_block))
        elif content_type in protocol.REPLY_CONTENT_TYPES:
            if not self._pending:
                raise ProtocolError(f"a {content_type} arrived with no command waiting for it")
            slot, _ = self._pending.popleft()
            slot.set(frame)
        elif content_type == protocol.CONTENT_DISCONNECT_NOTICE:
            if frame.headers.get("Content-Disposition") == "linger":
                self._on_hangup("the channel hung up (linger notice)")
            else:
                self._shutdown("FreeSWITCH sent its disconnect notice")
        elif content_type == protocol.CONTENT_LOG:
            headers = protocol.Headers([("Event-Name", "LOG"), *frame.headers.items()])
            self._on_event(Event(headers, frame.body or b""))
        else:
            log.warning("[%s] ignoring a frame of unexpected type %r", self.uuid, content_type)

    def _on_event(self, event: Event) -> None:
        """Queue an event for the handler (most of a call's frames: the queueing is inline),
        then resolve whatever waits for it."""
        self.counters.events += 1
        events = self._events
        if len(events) >= self.settings.max_queued_events:
            reason = (f"more than {self.settings.max_queued_events} events unread by the "
                      "handler (event queue overflow)")
            log.warning("[%s] %s; closing this call", self.uuid, reason)
            self._shutdown(reason)
            return
        # Queued first: a waiter resolved below runs at once, and must find it queued already.
        events.append(event)
        self._event_ready.set()
        name = event.name
        if name == "CHANNEL_EXECUTE_COMPLETE":
            _resolve(self._executes, event.get("Application-UUID"), event)
        elif name == "BACKGROUND_JOB":
            _resolve(self._jobs, event.get("Job-UUID"), event)
        elif name in ("CHANNEL_HANGUP", "CHANNEL_HANGUP_COMPLETE") and \
                event.unique_id == self.uuid:
            self.hangup_cause = as_text(event.get("Hangup-Cause"))
            self._on_hangup(f"the channel hung up ({self.hangup_cause})")

    def _on_hangup(self, reason: str) -> None:
        if self.hungup:
            return
        self.hungup = True
        waiters, self._executes = self._executes, {}
        self._fail(CallHungUp, reason, waiters.values())
        if self._hangup_flag is not None:
            self._hangup_flag.set()

    def _shutdown(self, reason: str) -> None:
        """The one teardown path: fail every waiter, end the event stream, close the socket."""
        if not self._teardown(reason):
            return
        if self._watcher is None:   # nothing reads (never started, or released): close now
            self._sock.close()
            return
        # FIN now, then keep reading until FreeSWITCH closes too: closing with its last bytes
        # unread would answer them with a reset.
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass   # the peer is already gone: the reader sees that and releases the socket
        self._drain_timer = self._watcher.loop.timer(CLOSE_DRAIN_SECONDS)
        self._drain_timer.start(self._release)

    def _teardown(self, reason: str) -> bool:
        """Fail every waiter and end the event stream (once: False if already done)."""
        if self._closed.is_set():
            return False
        self.close_reason = reason
        self._closed.set()
        if self._frame_timer is not None:
            self._frame_timer.close()
        pending, self._pending = self._pending, deque()
        executes, self._executes = self._executes, {}
        jobs, self._jobs = self._jobs, {}
        waiters = [*pending, *executes.values(), *jobs.values()]
        if self._resync is not None:   # closed while reattaching: reattach() learns it now
            waiters.append((self._resync[2], "sendmsg <marker>"))
            self._resync = None
        self._fail(SessionClosed, reason, waiters)
        self._events.append(_CLOSED)
        self._event_ready.set()
        if self._hangup_flag is not None:
            self._hangup_flag.set()
        return True

    def _fail(self, error: type, reason: str, waiters) -> None:
        """Wake every (result, command) waiter with ``error``, naming its command."""
        for slot, command in waiters:
            slot.set_exception(error(reason, uuid=self.uuid, command=command))


def close_after_poll(sock) -> None:
    """Close ``sock``, whose read watcher was just stopped, once the event loop has polled again.

    libev leaves a stopped watcher's descriptor in the epoll set until epoll next reports it.
    Closing at once is fine only while no other process holds the socket; but the master holds
    a copy of every call's socket (call survival), so epoll would go on reporting a descriptor
    libev can no longer remove (EBADF), and libev would rebuild its whole epoll set, one system
    call per open call, at every call's end: with 1000 calls held that doubled the CPU per call.
    A socket at end of file is reported by the next poll, libev removes it while it is still
    open, and only then does the timer close it.
    """
    get_hub().loop.timer(0).start(sock.close)


def _wait_flag(flag: Flag, timeout: float | None) -> bool:
    """``flag.wait(timeout)``, timed as a reply is (_Reply.get): for a timed wait gevent's Event
    makes a gevent.Timeout, a dozen Python calls, and most handlers wait so for their call's
    end (here one is made only when the wait does time out)."""
    if timeout is None or flag.is_set():
        return flag.wait(timeout)
    waiter = _Reply()
    flag.rawlink(waiter.switch)   # called with the flag
    try:
        return waiter.get(timeout) is flag
    except gevent.Timeout:
        return False
    finally:
        flag.unlink(waiter.switch)


def _resolve(waiters: dict, key: str | None, event: Event) -> None:
    """Hand ``event`` to the waiter registered under ``key`` (an Event-UUID or a Job-UUID)."""
    waiter = waiters.pop(as_text(key), None)
    if waiter is not None:
        waiter[0].set(event)
