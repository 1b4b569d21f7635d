"""What every worker process shares: what the master hands it, its exit codes, its entry point.

A worker is a forked child of the master. Whatever happens inside it, it leaves through
``child_main``'s ``os._exit`` so it can never fall back into the master's code, and any traceback
reaches stderr (journald under systemd) before it goes.

Exit codes are for people reading logs only: an app may exit with any code (``os._exit(3)``
included), so the master classifies an exit by what the worker *said* before it (gateway.ipc:
``bye``, ``boot_error``, ``app_exit``, ``crash``) and by the wait status, never by the code alone.
"""

from __future__ import annotations

import importlib
import os
import signal
import socket
import sys
import traceback
from dataclasses import dataclass

from setproctitle import setproctitle

from gateway.scoreboard import CounterBlock

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_BOOT_ERROR = 3    # the app could not be imported (also `esl-gateway run`'s own status then)


@dataclass
class WorkerSpec:
    """Everything a new worker needs, prepared by the master just before fork()."""

    slot: int
    generation: int
    config: object
    listeners: list[socket.socket]
    channel: socket.socket   # this worker's end of its socketpair with the master
    counters: CounterBlock   # this worker's page of shared counters
    ledger: socket.socket    # where it passes the master a copy of each call's socket
    # Blocked since before fork(); the worker unblocks them once its own handlers are in place.
    blocked_signals: set[int]


def set_title(text: str) -> None:
    setproctitle(f"esl-gateway: {text}")


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name if signum in signal.valid_signals() else str(signum)


def describe_wait_status(status: int) -> str:
    """How a child ended, from its wait status, in words for a log line."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        return f"was killed by signal {signum} ({signal_name(signum)})"
    return f"exited with code {os.waitstatus_to_exitcode(status)}"


def exit_status(exc: SystemExit) -> int:
    """The process exit status ``sys.exit(code)`` means, as the interpreter would make it."""
    if exc.code is None:
        return EXIT_OK
    return exc.code if isinstance(exc.code, int) else EXIT_CRASH


def child_main(spec: WorkerSpec, worker_class_path: str) -> None:
    """Run a worker in the freshly forked child and exit; never returns.

    The worker class is imported here, after fork(), so the master never imports gevent.
    """
    code = EXIT_CRASH
    try:
        module_name, _, class_name = worker_class_path.partition(":")
        worker_class = getattr(importlib.import_module(module_name), class_name)
        code = worker_class(spec).run()
    except SystemExit as exc:
        code = exit_status(exc)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
