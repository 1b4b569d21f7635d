"""``esl-gateway`` command line: ``run`` starts the master; ``reload`` and ``upgrade`` signal it."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from gateway import __version__, config, upgrade
from gateway.app import check_app
from workers.base import EXIT_BOOT_ERROR

LOG_FORMAT = "%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s"
DEFAULT_WORKER = "workers.gevent_worker:GeventWorker"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esl-gateway", description=__doc__)
    parser.add_argument("--version", action="version", version=f"esl-gateway {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run", help="start the master and its workers",
        description="Bind the listening sockets once and serve FreeSWITCH outbound ESL calls "
                    "with pre-forked gevent workers.")
    config.add_arguments(run)
    for name, what in (("reload", "start a new generation of workers with re-read config and "
                                  "fresh app code (HUP)"),
                       ("upgrade", "re-exec the master with new code, same PID (USR2)")):
        command = commands.add_parser(name, help=what, description=what)
        target = command.add_mutually_exclusive_group(required=True)
        target.add_argument("-p", "--pidfile", metavar="FILE", help="the master's --pidfile")
        target.add_argument("--pid", type=int, help="the master's PID")
    return parser


def setup_logging(level: str) -> None:
    """Everything goes to stderr: under systemd that is journald, where operators look."""
    logging.basicConfig(stream=sys.stderr, level=level, format=LOG_FORMAT)


def cmd_run(args: argparse.Namespace, argv: list[str]) -> int:
    from gateway.master import Master
    state, check_only = upgrade.inherited_state()
    cli_values = vars(args)
    try:
        cfg = config.resolve(cli_values)
    except config.ConfigError as exc:
        print(f"esl-gateway: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level)
    log = logging.getLogger("esl_gateway")
    if check_only or state is None:
        # A first start, or an upgrade's check of the new image: the app must load.
        if not check_app(cfg.app):
            log.error("the app %s cannot be loaded (traceback above); not starting", cfg.app)
            return EXIT_BOOT_ERROR
        if check_only:
            log.info("upgrade check passed: the new image starts and loads %s", cfg.app)
            return 0
    master = Master(cfg, DEFAULT_WORKER, argv, lambda: config.resolve(cli_values))
    try:
        return master.run(state)
    except OSError as exc:
        log.error("cannot listen on %s: %s", ", ".join(cfg.bind), exc)
        return 1


def cmd_signal(args: argparse.Namespace, signum: int) -> int:
    try:
        pid = args.pid or int(open(args.pidfile).read().strip())
        os.kill(pid, signum)
    except (OSError, ValueError) as exc:
        print(f"esl-gateway: cannot signal the master: {exc}", file=sys.stderr)
        return 1
    print(f"sent {signal.Signals(signum).name} to master {pid}; its log tells how it went")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return cmd_run(args, argv)
    return cmd_signal(args, signal.SIGHUP if args.command == "reload" else signal.SIGUSR2)


if __name__ == "__main__":
    sys.exit(main())
