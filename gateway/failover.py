"""FreeSWITCH's own failover across a fleet: ``socket host1:port|host2:port|...``, sans-IO.

The dialplan's ``socket`` app tries the hosts in order (mes.c:415-563, docs/esl-protocol.md §1):
a blocking connect to each, and the next host as soon as a connect *fails*. The failures a
connect reports at once are a refusal (nothing listens on that port: a stopped or drained
gateway, RST) and an unreachable host or network (ICMP). A host that swallows the SYN (firewall,
a full accept queue, a dead machine still in the neighbour cache) does not fail: the connect
blocks until the kernel gives up, about two minutes on Linux, which no caller waits out. So that
call stalls on that host and the next host is never tried. A fleet drains a host by making it
refuse, never by making it silent.

This module holds that rule (``fails_over``), the target list's syntax, and the per-host tally
that ``loadtest`` and ``probe`` print; the simulator applies the rule when it dials.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from gateway.listeners import parse_address

# What a connect reports at once, so FreeSWITCH moves on to the next host.
FAILOVER_ERRNOS = frozenset((errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH))


def parse_targets(text: str) -> list[tuple[str, int]]:
    """``HOST:PORT|HOST:PORT...`` (the socket app's first argument) → [(host, port), ...]."""
    targets = [parse_address(item.strip())[1] for item in text.split("|") if item.strip()]
    if not targets:
        raise ValueError(f"no HOST:PORT in {text!r}")
    return targets


def describe(target: tuple[str, int]) -> str:
    host, port = target
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def fails_over(error: OSError) -> bool:
    """Does FreeSWITCH try the next host after this connect error? Refused or unreachable:
    yes. A stalled handshake (a timeout) is not a connect error FreeSWITCH sees in time: no."""
    return error.errno in FAILOVER_ERRNOS


@dataclass
class HostTally:
    """One target's share of the calls: those it took (the TCP handshake completed there, then
    any outcome), the connects it refused (the call went on to the next host, if there was
    one) and the calls that stalled in its handshake (timed out there, no other host tried)."""

    calls: int = 0
    refused: int = 0
    stalled: int = 0


def tally(targets: list[tuple[str, int]], results) -> dict[str, HostTally]:
    """Per target, in the dialplan's order, from each call's ``host`` (the one it was last
    dialled to) and ``refused_by``."""
    hosts = {describe(target): HostTally() for target in targets}
    for result in results:
        for host in result.refused_by:
            hosts[host].refused += 1
        if result.accepted_ms is not None:
            hosts[result.host].calls += 1
        elif result.outcome == "timeout":
            hosts[result.host].stalled += 1
    return hosts
