"""The simulator's shortcuts keep FreeSWITCH's behaviour on the wire.

The simulator is cheap per call because it skips work: whole-command reads bypass the framer,
frames are assembled from cached pieces, apps run from loop callbacks. These tests pin what must
not change: reads parse exactly as the framer parses them, every frame goes out whole with a
send() of its own, in FreeSWITCH's order, with the bytes the protocol serialisers make.
"""

import random
import time
import uuid

import gevent
from gevent.server import StreamServer
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import protocol, simulator
from gateway.simulator import CallOptions, SimulatedCall

# -- whole-command reads --------------------------------------------------------------------

_word = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_0123456789",
                min_size=1, max_size=12)
_header = st.tuples(st.sampled_from(["call-command", "execute-app-name", "Event-UUID",
                                     "content-length", "Content-Length", "CONTENT-LENGTH",
                                     "Job-UUID"]) | _word,
                    st.text(alphabet="ab :%\t-0123456789é", max_size=12))


@st.composite
def _command_bytes(draw) -> bytes:
    line = draw(st.sampled_from(["connect", "linger 10", "myevents", "sendmsg", "exit", ""]))
    headers = draw(st.lists(_header, max_size=4))
    block = "\n".join([line, *(f"{name}: {value}" for name, value in headers)]).encode()
    if draw(st.booleans()):
        block = block.replace(b"\n", b"\r\n")
    return block + draw(st.sampled_from([b"\n\n", b"\n\n\n", b"\n\r\n", b"\n", b""]))


def _framed(data: bytes):
    """What a CommandParser holding nothing makes of ``data``, and whether it holds nothing after."""
    parser = protocol.CommandParser()
    try:
        commands = parser.feed(data)
    except protocol.ProtocolError:
        return None, False
    return [(c.line, list(c.headers.items()), c.body) for c in commands], not parser.mid_frame


@settings(max_examples=400, deadline=None)
@given(st.lists(_command_bytes(), min_size=1, max_size=4), st.booleans())
def test_whole_commands_parse_as_the_framer_does(commands, leading_blank):
    """Guards against the read shortcut ever disagreeing with the framer it stands in for."""
    data = (b"\n" if leading_blank else b"") + b"".join(commands)
    whole = protocol.whole_commands(data)
    if whole is None:
        return   # declined: the simulator feeds its CommandParser instead
    framed, complete = _framed(data)
    assert complete
    assert [(c.line, list(c.headers.items()), c.body) for c in whole] == framed


def test_whole_commands_take_the_common_reads_and_decline_the_rest():
    """Guards against the shortcut declining what every call reads, or taking what it cannot."""
    execute = protocol.execute("playback", "x.wav", event_uuid=str(uuid.uuid4()))
    assert [c.line for c in protocol.whole_commands(b"connect\n\nlinger 10\n\n")] == [
        "connect", "linger 10"]
    assert protocol.whole_commands(execute)[0].headers["execute-app-name"] == "playback"
    for declined in (protocol.execute("set", "a=1\nb"),   # a body
                     b"connect\r\n\r\n", b"\nconnect\n\n", b"connect\n", b"connect\n\n\n"):
        assert protocol.whole_commands(declined) is None, declined


# -- frames, byte for byte ------------------------------------------------------------------

def _call(**options) -> SimulatedCall:
    return SimulatedCall(("127.0.0.1", 9), CallOptions(**options), random.Random(1))


def _channel(call: SimulatedCall, answer_state: str) -> list[tuple[str, str]]:
    channel_state = "CS_HANGUP" if answer_state == "hangup" else "CS_EXECUTE"
    return [("Unique-ID", call.uuid), ("Channel-Name", "loopback/9090-b"),
            ("Channel-State", channel_state), ("Answer-State", answer_state),
            ("Caller-Caller-ID-Name", "Simulated Caller"),
            ("Caller-Caller-ID-Number", "0000000000"), ("Caller-Destination-Number", "9090"),
            ("Caller-Context", "default")]


def test_connect_reply_is_the_serialised_channel_data():
    """Guards against the templated connect reply drifting from connect_reply_frame's bytes."""
    call = _call(socket_mode="static", control="full")
    for answered, hungup, state, call_state in ((False, False, "ringing", "RINGING"),
                                                (True, False, "answered", "ACTIVE"),
                                                (True, True, "hangup", "HANGUP")):
        call.answered, call.hungup = answered, hungup
        before = time.strftime("%Y-%m-%d %H:%M:%S")
        reply = call._connect_reply()
        date = before if before.encode() in reply else time.strftime("%Y-%m-%d %H:%M:%S")
        data = [("Event-Name", "CHANNEL_DATA"), ("Core-UUID", simulator.CORE_UUID),
                ("FreeSWITCH-Hostname", "simulator"), ("Event-Date-Local", date),
                *_channel(call, state), ("Channel-Call-State", call_state),
                ("variable_uuid", call.uuid), ("variable_socket_host", "127.0.0.1"),
                ("variable_current_application", "socket")]
        assert reply == protocol.connect_reply_frame(data, "static", "full")


def test_events_are_the_serialised_headers():
    """Guards against events assembled from cached pieces differing from event_frame's."""
    app = ("playback", "ivr/welcome.wav", str(uuid.uuid4()))
    for fmt in protocol.EVENT_FORMATS:
        call = _call()
        call.event_format, call.subscribed, call.held = fmt, {"myevents"}, []
        call._run_app(*app, then=None)
        call.answered = True
        call._emit("CHANNEL_HANGUP", (("Hangup-Cause", "USER_BUSY"),))
        app_headers = [("Application", app[0]), ("Application-Data", app[1]),
                       ("Application-UUID", app[2])]
        for frame, name, state, extra in zip(call.held, (
                "CHANNEL_EXECUTE", "CHANNEL_EXECUTE_COMPLETE", "CHANNEL_HANGUP"), (
                "ringing", "ringing", "answered"), (
                app_headers, [*app_headers, ("Application-Response", "FILE PLAYED")],
                [("Hangup-Cause", "USER_BUSY")])):
            event = protocol.parse_event(protocol.Parser().feed(frame)[0])
            stamp = event["Event-Date-Timestamp"]
            expected = [("Event-Name", name), ("Core-UUID", simulator.CORE_UUID),
                        ("Event-Date-Timestamp", stamp), *_channel(call, state), *extra]
            assert frame == protocol.event_frame(expected, fmt=fmt), (fmt, name)
        assert len(call.held) == 3


# -- on the wire ----------------------------------------------------------------------------

class _RecordingSocket:
    """The call's socket, recording each send()."""

    def __init__(self, sock, sends):
        self._sock, self._sends = sock, sends

    def send(self, data):
        sent = self._sock.send(data)
        self._sends.append(bytes(data[:sent]))
        return sent

    def __getattr__(self, name):
        return getattr(self._sock, name)


def _play(monkeypatch, script, hold=0.0, **options):
    """One call against a scripted gateway: (the call's sends, its result).

    ``script``: what the gateway sends, each followed by a pause for the call to answer; then
    it keeps the socket ``hold`` seconds more before it closes.
    """
    sends = []
    handshake_done = SimulatedCall._handshake_done

    def recording(self, error):
        if not error:
            self.sock = _RecordingSocket(self.sock, sends)
        handshake_done(self, error)

    monkeypatch.setattr(SimulatedCall, "_handshake_done", recording)

    def drain(conn):
        """Read what the call sends: closing with unread data would reset the connection."""
        while conn.recv(65536):
            pass

    def gateway(conn, _):
        reader = gevent.spawn(drain, conn)
        for data in script:
            conn.sendall(data)
            gevent.sleep(0.05)
        gevent.sleep(hold)
        reader.kill()
        conn.close()

    server = StreamServer(("127.0.0.1", 0), gateway)
    server.start()
    try:
        result = SimulatedCall(server.address, CallOptions(**options), random.Random(2)).run()
    finally:
        server.stop()
    return sends, result


def _kinds(sends):
    """Each send as one frame's kind; fails if a send is not exactly one whole frame."""
    kinds = []
    for data in sends:
        parser = protocol.Parser()
        frames = parser.feed(data)
        assert len(frames) == 1 and not parser.mid_frame, data
        frame = frames[0]
        if frame.content_type == protocol.CONTENT_COMMAND_REPLY:
            kinds.append("connect-reply" if frame.body is None and "Event-Name" in frame.headers
                         else frame.reply_text)
        elif frame.content_type == protocol.CONTENT_DISCONNECT_NOTICE:
            kinds.append(frame.headers["Content-Disposition"])
        else:
            kinds.append(protocol.parse_event(frame).name)
    return kinds


_IVR = [protocol.connect(), protocol.linger(10), protocol.myevents(),
        protocol.execute("answer", event_uuid=str(uuid.uuid4())),
        protocol.execute("playback", "x.wav", event_uuid=str(uuid.uuid4())), protocol.hangup()]


def test_every_frame_has_its_own_send_in_freeswitchs_order(monkeypatch):
    """Guards against coalesced frames or events ahead of the reply to the command raising them."""
    sends, result = _play(monkeypatch, _IVR)
    assert result.outcome == "completed", result
    assert _kinds(sends) == [
        "connect-reply", "+OK will linger 10 seconds", "+OK Events Enabled", "CHANNEL_PARK",
        "+OK", "CHANNEL_EXECUTE", "CHANNEL_ANSWER", "CHANNEL_EXECUTE_COMPLETE",
        "+OK", "CHANNEL_EXECUTE", "CHANNEL_EXECUTE_COMPLETE",
        "+OK", "CHANNEL_HANGUP", "CHANNEL_UNPARK", "CHANNEL_EXECUTE_COMPLETE", "CHANNEL_STATE",
        "CHANNEL_HANGUP_COMPLETE", "linger"]


def test_commands_read_together_are_all_answered_before_their_apps_run(monkeypatch):
    """Guards against the channel running queued apps ahead of the listener's replies."""
    sends, result = _play(monkeypatch, [b"".join(_IVR[:5])])
    assert _kinds(sends) == [
        "connect-reply", "+OK will linger 10 seconds", "+OK Events Enabled", "CHANNEL_PARK",
        "+OK", "+OK", "CHANNEL_EXECUTE", "CHANNEL_ANSWER", "CHANNEL_EXECUTE_COMPLETE",
        "CHANNEL_EXECUTE", "CHANNEL_EXECUTE_COMPLETE"]
    assert result.outcome == "early_close"


def test_static_apps_reply_first_and_the_linger_notice_precedes_the_hangup(monkeypatch):
    """Guards against a static socket's held events overtaking the reply they follow."""
    sends, result = _play(monkeypatch, _IVR, socket_mode="static", playback_ms=20,
                          linger_cap=0.01)
    assert result.outcome == "completed", result
    assert _kinds(sends) == [
        "connect-reply", "+OK will linger 10 seconds", "+OK Events Enabled",
        "+OK", "CHANNEL_EXECUTE", "CHANNEL_ANSWER", "CHANNEL_EXECUTE_COMPLETE",
        "+OK", "CHANNEL_EXECUTE", "CHANNEL_EXECUTE_COMPLETE",
        "+OK", "linger", "CHANNEL_HANGUP", "disconnect"]


def test_a_gateway_holding_the_socket_after_the_notice_times_out(monkeypatch):
    """Guards against close_grace counting from anything but the disconnect notice."""
    sends, result = _play(monkeypatch, [*_IVR[:3], protocol.hangup()], hold=1.0,
                          linger_cap=0.01, close_grace=0.2)
    assert _kinds(sends)[-2:] == ["linger", "disconnect"]
    assert result.outcome == "timeout" and "after the disconnect notice" in result.detail


def test_uuids_are_version_4():
    """Guards against the UUID shortcut producing anything uuid.uuid4() would not."""
    for _ in range(2000):
        value = uuid.UUID(simulator._uuid4())
        assert value.version == 4 and value.variant == uuid.RFC_4122
