"""The fork server: one booted process per generation that forks that generation's workers.

A worker forked by the master has to import gevent and monkey-patch the process before it can
take a call: about 90 ms of CPU here, paid again by every replacement. At 1 % crashing calls and
500 calls/s that is five boots a second, half a core of a 2-core machine, taken exactly when a
worker has just died. The fork server pays it once: it imports the worker's code and patches,
then only forks, so a new worker is ready in a few milliseconds. It does not import the app:
each worker still imports it after fork, so what the app opens at import (database pools,
threads) is never shared between workers, and a reload still loads fresh app code.

Workers must stay the master's children (it reaps them, reads their wait status and owns their
slots), so each one is forked twice: the fork server's helper child forks the worker and exits
at once, and the worker is re-parented to the master, a child subreaper
(PR_SET_CHILD_SUBREAPER). The helper writes the worker's pid into the worker's shared counters
before it exits, so the master knows the pid before it can ever reap it.

The fork server runs no event loop: it blocks on its socket (SOCK_SEQPACKET, one message per
request, created by the master before patching, so its calls are the original blocking ones),
and a forked worker starts with no hub, no thread and no greenlet of the fork server's.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import traceback

from gateway import ipc
from gateway.scoreboard import INDEX, CounterBlock
from workers.base import EXIT_BOOT_ERROR, EXIT_OK, WorkerSpec, child_main, set_title

class ForkServer:
    def __init__(self, spec: WorkerSpec):
        self.template = spec    # a worker's spec, less its slot, channel and counters
        self.channel = spec.channel

    def run(self) -> int:
        set_title(f"fork server [gen {self.template.generation}]")
        try:
            from workers.gevent_worker import prepare
            prepare()
        except BaseException:
            self._send("boot_error", traceback=traceback.format_exc())
            return EXIT_BOOT_ERROR
        from gevent import monkey
        fork, waitpid = monkey.get_original("os", ("fork", "waitpid"))
        self._socket_type = monkey.get_original("socket", "socket")
        self._send("ready")
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.template.blocked_signals)
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.channel, 65536, 3)
            except OSError:
                data = b""
            if not data:
                return EXIT_OK   # the master is gone, or closed us: no more workers to fork
            [message] = ipc.MessageReader().feed(data)
            self._fork(fork, waitpid, int(message["slot"]), str(message["worker_class"]), fds)

    def _fork(self, fork, waitpid, slot: int, worker_class: str, fds: list[int]) -> None:
        channel_fd, counters_fd, ledger_fd = fds
        # Blocked from before fork() until the worker has its own handlers, as the master does.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, self.template.blocked_signals)
        helper = fork()
        if helper == 0:
            code = 1
            try:
                worker = fork()
                if worker == 0:
                    self.channel.close()
                    spec = dataclasses.replace(
                        self.template, slot=slot,
                        channel=self._socket_type(socket.AF_UNIX, socket.SOCK_STREAM,
                                                  fileno=channel_fd),
                        counters=CounterBlock(counters_fd),
                        ledger=self._socket_type(socket.AF_UNIX, socket.SOCK_STREAM,
                                                 fileno=ledger_fd))
                    child_main(spec, worker_class)
                block = CounterBlock(counters_fd)
                block.values[INDEX["pid"]] = worker
                code = 0
            finally:
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for fd in fds:
            os.close(fd)
        waitpid(helper, 0)

    def _send(self, kind: str, **fields) -> None:
        self.channel.send(ipc.pack(kind, pid=os.getpid(), **fields))
