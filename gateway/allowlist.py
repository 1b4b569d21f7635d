"""Who may connect (--allow): the peer's address against a list of networks, before any byte is
sent. An outbound ESL port trusts what it is told: anything that reaches it can feed the call
control fake channel data, so only FreeSWITCH's addresses should get ``connect``."""

from __future__ import annotations

import ipaddress

SEEN_KEPT = 1024   # peer addresses whose verdict is remembered (FreeSWITCH is a few hosts)


class Allowlist:
    def __init__(self, networks: list[str]):
        parsed = [ipaddress.ip_network(network, strict=False) for network in networks]
        self._networks = {4: [n for n in parsed if n.version == 4],
                          6: [n for n in parsed if n.version == 6]}
        self._seen: dict[str, bool] = {}

    def allows(self, address) -> bool:
        """``address`` as accept() returns it. A Unix-socket peer (a path, not a tuple) is
        allowed: the socket file's permissions decide who reaches it."""
        if not isinstance(address, tuple):
            return True
        host = address[0]
        verdict = self._seen.get(host)
        if verdict is None:
            verdict = self._check(host)
            if len(self._seen) < SEEN_KEPT:   # bounded: a scan from many addresses
                self._seen[host] = verdict
        return verdict

    def _check(self, host: str) -> bool:
        ip = ipaddress.ip_address(host.partition("%")[0])   # an IPv6 scope id is not an address
        if ip.version == 6 and ip.ipv4_mapped is not None:   # an IPv4 peer of a [::] socket
            ip = ip.ipv4_mapped
        return any(ip in network for network in self._networks[ip.version])
