"""In-place master upgrade: the same PID re-execs new code and keeps its sockets and workers.

einhorn and HAProxy -W style. The master writes its state (listener and worker-channel fds,
worker table, generations, counters) as msgpack into a memfd, first starts the new image in
*check* mode in a child (imports the new code, loads the config and the app, decodes the state,
exits), and only if that succeeds exec()s itself with the fds and the state fd inherited. A new
image that cannot start is found by the check while the old master is still running: that is the
rollback. The PID never changes, so systemd's MAINPID stays right and workers stay children.
"""

from __future__ import annotations

import os
import signal
import sys

import msgpack

STATE_FD_ENV = "ESL_GATEWAY_UPGRADE_STATE_FD"
CHECK_ENV = "ESL_GATEWAY_UPGRADE_CHECK"


def write_state(state: dict) -> int:
    """The state in an anonymous in-memory file; returns its (non-inheritable) fd."""
    fd = os.memfd_create("esl-gateway-state", os.MFD_CLOEXEC)
    os.write(fd, msgpack.packb(state, use_bin_type=True))
    return fd


def read_state(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return msgpack.unpackb(b"".join(chunks), raw=False, strict_map_key=False)   # call ids


def inherited_state() -> tuple[dict | None, bool]:
    """(state, check_only) when this process is an upgrade's new image, else (None, False)."""
    value = os.environ.pop(STATE_FD_ENV, None)
    check_only = os.environ.pop(CHECK_ENV, None) == "1"
    if value is None:
        return None, False
    fd = int(value)
    try:
        return read_state(fd), check_only
    finally:
        os.close(fd)


def image_command(argv: list[str]) -> list[str]:
    """How to start the new image: this interpreter, the installed package, the same arguments."""
    return [sys.executable, "-m", "gateway", *argv]


def start_check(argv: list[str], state_fd: int, ignored: frozenset[int]) -> int:
    """Fork a child that runs the new image in check mode; returns its pid. The ``ignored``
    signals are ignored in it from fork() on, and stay so across exec: one sent to every
    process of the unit must not fail the check."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, ignored)
    pid = os.fork()
    if pid == 0:
        try:
            for signum in range(1, signal.NSIG):
                try:
                    signal.signal(signum, signal.SIG_IGN if signum in ignored else signal.SIG_DFL)
                except (OSError, ValueError):
                    continue   # SIGKILL, SIGSTOP and the like cannot be changed
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)   # what came meanwhile is dropped
            os.set_inheritable(state_fd, True)
            env = dict(os.environ, **{STATE_FD_ENV: str(state_fd), CHECK_ENV: "1"})
            os.execve(sys.executable, image_command(argv), env)
        finally:
            os._exit(127)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    return pid


def exec_image(argv: list[str], state_fd: int, keep_fds: list[int]) -> None:
    """Replace this process with the new image; returns only if exec() itself failed."""
    for fd in [state_fd, *keep_fds]:
        os.set_inheritable(fd, True)
    env = dict(os.environ, **{STATE_FD_ENV: str(state_fd)})
    try:
        os.execve(sys.executable, image_command(argv), env)
    except OSError:
        for fd in [state_fd, *keep_fds]:
            os.set_inheritable(fd, False)
        raise
