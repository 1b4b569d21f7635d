"""systemd integration without a dependency: the notify protocol is one datagram.

* ``notify("READY=1")`` and friends go to ``$NOTIFY_SOCKET`` (a path, or ``@`` for the abstract
  namespace); outside systemd there is no such socket and they do nothing.
* ``store_fds`` pushes our listening sockets into systemd's fd store (``FDSTORE=1``) so a crash or
  ``systemctl restart`` of the master queues calls instead of refusing them: systemd hands the
  same sockets back on the next start, exactly like socket activation.
* ``listen_fds`` takes sockets passed by systemd (``LISTEN_FDS``/``LISTEN_PID``/``LISTEN_FDNAMES``).
"""

from __future__ import annotations

import array
import logging
import os
import socket
import time

LISTEN_FDS_START = 3
NOTIFY_WARN_EVERY = 60.0   # seconds between two warnings that systemd does not hear us

log = logging.getLogger("esl_gateway.systemd")
_warned_at = -NOTIFY_WARN_EVERY


def notify(*fields: str, fds: list[int] | None = None) -> bool:
    """Send ``KEY=value`` fields to systemd; False when not running under a notify socket, or
    when the datagram cannot be sent (systemd is gone or restarting: like sd_notify, that
    never stops the caller, which may be in the middle of stopping; a warning says it)."""
    global _warned_at
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    message = "\n".join(fields).encode("utf-8")
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _fd_array(fds))] if fds else []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendmsg([message], ancillary, 0, address)
    except OSError as exc:
        now = time.monotonic()
        if now - _warned_at >= NOTIFY_WARN_EVERY:
            _warned_at = now
            log.warning("cannot notify systemd at %s (%s); carrying on without it (this "
                        "warning repeats at most every %.0fs)", os.environ["NOTIFY_SOCKET"],
                        exc, NOTIFY_WARN_EVERY)
        return False
    return True


def monotonic_usec() -> str:
    """MONOTONIC_USEC for RELOADING=1 (Type=notify-reload wants to match it to the signal)."""
    return f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"


def store_fds(socks: list[socket.socket], name: str) -> bool:
    """Keep copies of our listening sockets in systemd's fd store (FileDescriptorStoreMax>0)."""
    if not socks:
        return False
    return notify("FDSTORE=1", f"FDNAME={name}", fds=[sock.fileno() for sock in socks])


def listen_fds() -> list[tuple[socket.socket, str]]:
    """Sockets systemd passed us, with their names; empty when not socket activated.

    ``LISTEN_PID`` must be ours (a forked child would otherwise take its parent's sockets); the
    variables are removed so that nothing we start later takes them again.
    """
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = int(os.environ.get("LISTEN_FDS", "0"))
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)
    socks = []
    for index in range(count):
        sock = socket.socket(fileno=LISTEN_FDS_START + index)
        os.set_inheritable(sock.fileno(), False)
        socks.append((sock, names[index] if index < len(names) else ""))
    return socks


def watchdog_interval() -> float | None:
    """Half the watchdog period systemd asked for (WATCHDOG_USEC), or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec or os.environ.get("WATCHDOG_PID", str(os.getpid())) != str(os.getpid()):
        return None
    return int(usec) / 1e6 / 2


def _fd_array(fds: list[int]) -> bytes:
    return array.array("i", fds).tobytes()
