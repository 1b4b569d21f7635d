"""``esl-gateway`` command line: ``run`` starts the master; ``reload``, ``upgrade``, ``drain`` and
``undrain`` signal it; ``stats`` and ``top`` show what it sees."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from gateway import __version__, config, drain, loadtest, probe, upgrade
from gateway.app import check_app
from workers.base import EXIT_BOOT_ERROR

LOG_FORMAT = "%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s"
DEFAULT_WORKER = "workers.gevent_worker:GeventWorker"
STATS_SETTINGS = ("stats", "stats_token", "stats_token_file")   # how to reach the master's stats
DEPLOYS = ("reload", "upgrade")   # the signal commands that can --wait
DEPLOY_POLL = 0.1   # seconds between two looks at /stats while waiting for a deploy
DEPLOY_SLACK = 30   # --wait gives up this long after the master's ready_timeout
# The commands that signal the master: (signal, its name as `kill -s` takes it, what it does).
SIGNAL_COMMANDS = {
    "reload": (signal.SIGHUP, "HUP", "start a new generation of workers with re-read config and "
                                     "fresh app code"),
    "upgrade": (signal.SIGUSR2, "USR2", "re-exec the master with new code, same PID"),
    "drain": (drain.DRAIN_SIGNAL, "RTMIN+1",
              "take no new calls: serve every queued call, then refuse connects so FreeSWITCH "
              "fails over to the next host; calls in progress go on"),
    "undrain": (drain.UNDRAIN_SIGNAL, "RTMIN+2", "take new calls again after a drain"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esl-gateway", description=__doc__)
    parser.add_argument("--version", action="version", version=f"esl-gateway {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run", help="start the master and its workers",
        description="Bind the listening sockets once and serve FreeSWITCH outbound ESL calls "
                    "with pre-forked gevent workers.")
    config.add_arguments(run)
    probe_command = commands.add_parser(
        "probe", help="play FreeSWITCH calling a listener once, and say what it would see",
        description=probe.__doc__.split("\n\n")[0])
    probe.add_arguments(probe_command)
    loadtest_command = commands.add_parser(
        "loadtest", help="offer simulated FreeSWITCH calls to an outbound ESL server",
        description=loadtest.__doc__.split("\n\n")[0])
    loadtest.add_arguments(loadtest_command)
    for name, what in (("stats", "print the master's statistics once"),
                       ("top", "a live view of workers, generations, call rates and the queue")):
        command = commands.add_parser(name, help=what, description=what)
        config.add_arguments(command, STATS_SETTINGS)
        if name == "stats":
            command.add_argument("--json", action="store_true", help="the raw JSON")
        else:
            command.add_argument("-i", "--interval", type=float, default=2.0, metavar="SECONDS")
            command.add_argument("-n", "--count", type=int, metavar="N",
                                 help="stop after N screens (default: until Ctrl-C)")
    for name, (_, signal_name, what) in SIGNAL_COMMANDS.items():
        what = (f"{what} ({signal_name}); the master is found by --pid, or by the pidfile of -p "
                "or of the config file -c")
        command = commands.add_parser(name, help=what, description=what)
        command.add_argument("--pid", type=int, help="the master's PID")
        config.add_arguments(command, ("pidfile", *STATS_SETTINGS))
        if name in DEPLOYS:
            command.add_argument(
                "--wait", action="store_true",
                help=f"return once the {name} is complete (exit 0) or abandoned (exit 1, with "
                     "the reason), as the master's stats endpoint tells; for ExecReload=, so "
                     f"that `systemctl reload` waits and fails with the {name}")
    return parser


def setup_logging(level: str) -> None:
    """Everything goes to stderr: under systemd that is journald, where operators look."""
    logging.basicConfig(stream=sys.stderr, level=level, format=LOG_FORMAT)


def cmd_run(args: argparse.Namespace, argv: list[str]) -> int:
    from gateway.master import Master, stats_token
    from gateway.privileges import PrivilegeError
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
        for app in filter(None, (cfg.app, cfg.resume)):
            if not check_app(app):
                log.error("the app %s cannot be loaded (why is above); not starting", app)
                return EXIT_BOOT_ERROR
        if check_only:
            log.info("upgrade check passed: the new image starts and loads %s",
                     cfg.app or "the proxy")
            return 0
    try:
        stats_token(cfg)   # read now, so an unreadable token file stops us before binding
    except (OSError, ValueError) as exc:
        log.error("cannot read the stats token: %s; not starting", exc)
        return 2
    master = Master(cfg, DEFAULT_WORKER, argv, lambda: config.resolve(cli_values))
    try:
        return master.run(state)
    except PrivilegeError as exc:
        log.error("cannot drop privileges: %s; not starting", exc)
        return 1
    except OSError as exc:
        log.error("cannot listen on %s: %s", ", ".join(cfg.bind), exc)
        return 1


def master_settings(args: argparse.Namespace) -> config.Config:
    """The running master's settings as its config file, the environment and our flags say."""
    return config.resolve(vars(args), need_app=False)


def stats_fetcher(cfg: config.Config):
    """A function returning the master's /stats, its bearer token read once."""
    from gateway import report
    from gateway.master import stats_token
    token = stats_token(cfg)
    return lambda: report.fetch(cfg.stats, token)


def cmd_signal(args: argparse.Namespace) -> int:
    signum, name, _ = SIGNAL_COMMANDS[args.command]
    try:
        cfg = master_settings(args)
        if args.pid is None and cfg.pidfile is None:
            raise ValueError("give --pid, -p PIDFILE, or -c CONFIG with a pidfile")
        pid = args.pid or int(Path(cfg.pidfile).read_text().strip())
        wait = getattr(args, "wait", False)
        if wait:
            if cfg.stats == "none":
                raise ValueError("--wait reads the master's stats endpoint, and stats is none")
            fetch = stats_fetcher(cfg)
            before = fetch()["master"]   # before the signal: a deploy is told by what changed
        os.kill(pid, signum)
    except (OSError, ValueError, config.ConfigError) as exc:
        print(f"esl-gateway: cannot signal the master: {exc}", file=sys.stderr)
        return 1
    if not wait:
        print(f"sent SIG{name} to master {pid}; its log tells how it went")
        return 0
    done, outcome = wait_for_deploy(args.command, fetch, before, cfg.ready_timeout + DEPLOY_SLACK)
    print(f"master {pid}: {outcome}", file=sys.stdout if done else sys.stderr)
    return 0 if done else 1


def wait_for_deploy(kind: str, fetch, before: dict, timeout: float) -> tuple[bool, str]:
    """(done, what happened) once the deploy the master was just signalled for is complete (a
    newer generation serves, none is starting) or abandoned (its failure count rose)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(DEPLOY_POLL)
        try:
            master = fetch()["master"]
        except OSError:
            continue   # an upgrading master re-execs; its stats socket answers again shortly
        if master[f"{kind}_failures"] > before[f"{kind}_failures"]:
            return False, f"{kind} abandoned: {master['last_deploy_error']['reason']}"
        if master["generation"] > before["generation"] and master["starting_generation"] is None:
            return True, f"{kind} complete: generation {master['generation']} accepting"
    return False, f"{kind} neither complete nor abandoned after {timeout:.0f}s (its log tells why)"


def cmd_stats(args: argparse.Namespace) -> int:
    from gateway import report
    try:
        cfg = master_settings(args)
    except config.ConfigError as exc:
        print(f"esl-gateway: {exc}", file=sys.stderr)
        return 2
    try:
        fetch = stats_fetcher(cfg)
        if args.command == "top":
            report.top(fetch, args.interval, args.count, sys.stdout)
            return 0
        view = fetch()
    except KeyboardInterrupt:
        return 0
    except (OSError, ValueError) as exc:
        print(f"esl-gateway: no stats at {cfg.stats}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(view, indent=1) if args.json else report.render(view))
    return 0 if view["health"]["ok"] else 3


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return cmd_run(args, argv)
    if args.command in ("stats", "top"):
        return cmd_stats(args)
    if args.command == "loadtest":
        return loadtest.main(args)
    if args.command == "probe":
        return probe.main(args)
    return cmd_signal(args)


if __name__ == "__main__":
    sys.exit(main())
