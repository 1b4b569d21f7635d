"""``esl-gateway probe HOST:PORT``: what would FreeSWITCH experience calling this listener?

Plays FreeSWITCH's side of one call against any outbound ESL listener (ours or not) and says it
in plain words: refused; a handshake nobody answers; accepted but silent (and that FreeSWITCH
gives up after 25 s); a listener that speaks *inbound* ESL (``auth/request``, the classic
misdiagnosis); or, for an outbound server, how soon it sent ``connect``, which commands followed
and how the call ended. For an esl-gateway in proxy mode, given its ``--stats`` address, it also
says which backend the call was relayed to. The exit status is 0 only for a listener that
behaves as an outbound server should.
"""

from __future__ import annotations

import argparse
import time

from gateway import failover
from gateway.protocol import SOCKET_MODES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", metavar="HOST:PORT[|HOST:PORT...]",
                        help="the listener to probe, or several tried in order with "
                             "FreeSWITCH's failover")
    parser.add_argument("--wait", type=float, default=25.0, metavar="SECONDS",
                        help="how long to wait for `connect` (FreeSWITCH waits 25 s)")
    parser.add_argument("--mode", choices=SOCKET_MODES, default="async full",
                        help="the dialplan's socket keywords to play")
    parser.add_argument("--stats", metavar="HOST:PORT",
                        help="an esl-gateway's --stats address: for a gateway in proxy mode, "
                             "say which backend the call was relayed to")


def probe(args: argparse.Namespace) -> tuple[bool, list[str]]:
    """(behaves as an outbound ESL server, the findings in plain words)."""
    import random

    from gateway.simulator import CallOptions, SimulatedCall
    socket_mode, control = SOCKET_MODES[args.mode]
    options = CallOptions(socket_mode=socket_mode, control=control, connect_wait=args.wait,
                          call_deadline=args.wait + 60)
    result = SimulatedCall(failover.parse_targets(args.address), options, random.Random()).run()
    lines = [f"probing {args.address} as FreeSWITCH's `socket {args.address} {args.mode}` "
             "would call it:"]
    if "|" in args.address:
        lines += [f"{host}: refused (FreeSWITCH tries the next host at once)"
                  for host in result.refused_by]
        if result.accepted_ms is not None:
            lines.append(f"{result.host}: took the call")
    if result.accepted_ms is None:
        if result.outcome == "refused":
            lines.append(f"REFUSED: {result.detail}. Nothing accepts connections there: "
                         "FreeSWITCH logs `Socket Error: Connection refused` and the dialplan "
                         "moves on at once (to the next `host1|host2`, or the next action).")
        else:
            lines.append(f"NO ANSWER to the TCP handshake ({result.detail}): a firewall drops "
                         "it, or the accept queue is full. FreeSWITCH's connect then blocks "
                         "(about 2 minutes on Linux) and does not fail over.")
        return False, lines
    lines.append(f"TCP: accepted in {result.accepted_ms:.1f} ms")
    first = result.commands[0] if result.commands else None
    if first is None and result.outcome == "timeout":
        lines.append(f"ACCEPTED BUT SILENT: nothing was sent for {args.wait:g} s. In outbound "
                     "mode the server must speak first (`connect`); FreeSWITCH waits 25 s, logs "
                     "`Socket Error!` and the dialplan moves on. A hung or overloaded server, or "
                     "one waiting for FreeSWITCH to speak, looks like this.")
        return False, lines
    if result.outcome == "protocol_error" and "auth/request" in result.detail:
        lines.append("WRONG MODE: this is an INBOUND event socket: it asked for a password "
                     "(`Content-Type: auth/request`), as FreeSWITCH's own mod_event_socket does "
                     "on 8021. The dialplan's `socket` app needs an OUTBOUND server, one that "
                     "sends `connect` first.")
        return False, lines
    if result.first_byte_ms is None:
        lines.append(f"NOT AN OUTBOUND ESL SERVER: {result.outcome}: {result.detail}")
        return False, lines
    lines.append(f"connect: sent {result.first_byte_ms - result.accepted_ms:.1f} ms after the "
                 "accept (FreeSWITCH would have waited up to 25 s)")
    lines.append("commands: " + ", ".join(result.commands))
    lines += _advice(result.commands, control)
    endings = {
        "completed": "the call was hung up, then the server closed the socket",
        "early_close": "the server closed the socket while the call was up: FreeSWITCH "
                       "continues with the dialplan's next action",
    }
    behaves = result.outcome in endings
    lines.append(f"ending: {endings.get(result.outcome, f'{result.outcome}: {result.detail}')}"
                 f" ({result.duration_ms:.0f} ms in all)")
    if args.stats:
        lines.append(_relayed_to(args.stats, result.local_address))
    lines.append("verdict: " + ("OK, a working outbound ESL server" if behaves else
                                "FAILING: FreeSWITCH would see this call fail"))
    return behaves, lines


def _relayed_to(stats: str, local_address: str) -> str:
    """Which backend an esl-gateway in proxy mode relayed our call to, from its /stats (its
    workers report their recent relays with their heartbeats, about once a second)."""
    from gateway import report
    deadline = time.monotonic() + 3
    while True:
        try:
            proxy = report.fetch(stats).get("proxy")
        except OSError as exc:
            return f"proxy: no stats at {stats} ({exc})"
        if proxy is None:
            return f"proxy: the gateway at {stats} is not in proxy mode"
        backends = [backend for peer, backend in proxy["recent"] if peer == local_address]
        if backends:
            return f"proxy: the gateway relayed this call to backend {backends[-1]}"
        if time.monotonic() > deadline:
            return f"proxy: the gateway at {stats} lists no relay of this call ({local_address})"
        time.sleep(0.2)


def _advice(commands: list[str], control: str) -> list[str]:
    """What an operator should know about the command sequence, FreeSWITCH's facts in hand."""
    notes = []
    lingers = [c for c in commands if c.split(" ", 1)[0] == "linger"]
    if "linger" in lingers:
        notes.append("note: a bare `linger` keeps the channel inside FreeSWITCH until the server "
                     "closes the socket; prefer `linger N`")
    elif not lingers and control == "full":
        notes.append("note: no `linger`: FreeSWITCH usually drops CHANNEL_HANGUP_COMPLETE")
    if not any(c.split(" ", 1)[0] in ("myevents", "event") for c in commands):
        notes.append("note: no `myevents`/`event`: the server cannot see execute completions "
                     "or the hangup")
    return notes


def main(args: argparse.Namespace) -> int:
    behaves, lines = probe(args)
    print("\n".join(lines))
    return 0 if behaves else 1
