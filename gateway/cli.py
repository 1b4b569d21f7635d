"""``esl-gateway`` command line: ``run`` starts the master (more commands join it later)."""

from __future__ import annotations

import argparse
import logging
import sys

from gateway import __version__, config
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
    return parser


def setup_logging(level: str) -> None:
    """Everything goes to stderr: under systemd that is journald, where operators look."""
    logging.basicConfig(stream=sys.stderr, level=level, format=LOG_FORMAT)


def cmd_run(args: argparse.Namespace) -> int:
    from gateway.master import Master
    try:
        cfg = config.resolve(vars(args))
    except config.ConfigError as exc:
        print(f"esl-gateway: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level)
    log = logging.getLogger("esl_gateway")
    if not check_app(cfg.app):
        log.error("the app %s cannot be loaded (traceback above); not starting", cfg.app)
        return EXIT_BOOT_ERROR
    try:
        return Master(cfg, DEFAULT_WORKER).run()
    except OSError as exc:
        log.error("cannot listen on %s: %s", ", ".join(cfg.bind), exc)
        return 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return {"run": cmd_run}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
