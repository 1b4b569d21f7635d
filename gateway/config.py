"""Every setting, declared once: type, default, CLI flag, config-file key, environment variable, help.

The command-line parser, the config-file reader, the environment lookup and the settings table in
the README are all generated from ``SETTINGS`` below, so they cannot drift apart.

Precedence, lowest first: default < config file (``-c FILE``, INI section ``[esl-gateway]``) <
environment (``ESL_GATEWAY_<NAME>``) < command line. The master re-reads the file on reload.
"""

from __future__ import annotations

import argparse
import configparser
import ipaddress
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

from gateway import protocol

ENV_PREFIX = "ESL_GATEWAY_"
# Who may connect by default: loopback and the private ranges, where FreeSWITCH usually is.
DEFAULT_ALLOW = ("127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
                 "fc00::/7")
FILE_SECTION = "esl-gateway"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be at least 1, not {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"must not be negative, not {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise ValueError(f"must not be negative, not {value}")
    return value


def backend_list(text: str) -> list[str]:
    """``HOST:PORT`` or ``unix:/path`` backends, comma- or space-separated."""
    backends = address_list(text)
    for backend in backends:
        if not backend.startswith("unix:/"):
            host, sep, port = backend.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"a backend is HOST:PORT or unix:/PATH, not {backend!r}")
    return backends


def address_list(text: str) -> list[str]:
    """Comma- or space-separated ``HOST:PORT`` list (the file and environment form of --bind)."""
    return [item for item in text.replace(",", " ").split() if item]


@dataclass(frozen=True)
class CallAction:
    """What the gateway does with a call it has to give up on: ``dialplan`` closes the socket so
    FreeSWITCH's dialplan goes on with its next action; ``hangup[:CAUSE]`` hangs the call up;
    ``transfer:EXTENSION[:DIALPLAN:CONTEXT]`` sends it to another extension."""

    kind: str
    argument: str | None = None   # the hangup cause, or the transfer app's "EXT DIALPLAN CTX"

    def __str__(self) -> str:
        if self.argument is None:
            return self.kind
        return f"{self.kind}:{self.argument.replace(' ', ':')}"


def call_action(text: str) -> CallAction:
    kind, _, rest = text.strip().partition(":")
    kind = kind.lower()
    if kind == "dialplan" and not rest:
        return CallAction("dialplan")
    if kind == "hangup":
        cause = rest.upper() or "NORMAL_CLEARING"
        if not re.fullmatch(r"[A-Z0-9_]+", cause):
            raise ValueError(f"not a hangup cause: {cause!r}")
        return CallAction("hangup", cause)
    parts = rest.split(":")
    if kind == "transfer" and len(parts) in (1, 3) and all(
            re.fullmatch(r"[\w+*#.@-]+", part) for part in parts):
        return CallAction("transfer", " ".join(parts))
    raise ValueError("must be dialplan, hangup[:CAUSE] or transfer:EXTENSION[:DIALPLAN:CONTEXT], "
                     f"not {text!r}")


def network_list(text: str) -> list[str]:
    """Comma- or space-separated CIDR networks (``10.0.0.0/8``, ``::1/128``; a bare address is
    one host), validated now and kept as text so the config stays printable."""
    networks = address_list(text)
    for network in networks:
        ipaddress.ip_network(network, strict=False)   # ValueError names the bad one
    return networks


def optional_text(text: str) -> str | None:
    return text.strip() or None


def on_off(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("on", "off", "yes", "no", "true", "false", "1", "0"):
        raise ValueError(f"must be on or off, not {text!r}")
    return value in ("on", "yes", "true", "1")


def log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(f"unknown log level {text!r}")
    return level


@dataclass(frozen=True)
class Setting:
    name: str
    type: Callable[[str], Any]
    default: Any
    flags: tuple[str, ...]
    help: str
    metavar: str | None = None
    repeatable: bool = False     # a CLI flag given several times accumulates (like gunicorn -b)
    default_doc: str | None = None   # how the docs show a computed default

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def file_key(self) -> str:
        return self.name

    def default_value(self) -> Any:
        return self.default() if callable(self.default) else self.default


SETTINGS: tuple[Setting, ...] = (
    Setting("app", str, None, (), metavar="MODULE:CALLABLE",
            help="The call-control handler, called as handler(session) once per call (or "
                 "--proxy instead)."),
    Setting("proxy", backend_list, list, ("--proxy",), metavar="HOST:PORT[,HOST:PORT...]",
            default_doc="—",
            help="Proxy mode, instead of an app: relay each call byte for byte to an outbound "
                 "ESL listener of any language (round robin over those that answer; "
                 "`unix:/path` too)."),
    Setting("backend_wait", non_negative_float, 20.0, ("--backend-wait",), metavar="SECONDS",
            help="Proxy mode: how long a call waits, FreeSWITCH's side connected, for a backend "
                 "to answer (retrying across them) before it is handed back to the dialplan; "
                 "keep it under FreeSWITCH's 25 s wait for `connect`."),
    Setting("backend_reconnect", on_off, False, ("--backend-reconnect",), metavar="on|off",
            default_doc="`off`",
            help="Proxy mode: when a backend dies mid-call, connect another and let it take the "
                 "call over as a new one (off: FreeSWITCH's side is closed, the dialplan goes "
                 "on)."),
    Setting("bind", address_list, lambda: ["127.0.0.1:9090"], ("-b", "--bind"),
            metavar="HOST:PORT", repeatable=True,
            help="Address to listen on; repeat for several. [::]:PORT is dual-stack IPv4+IPv6."),
    Setting("workers", positive_int, lambda: os.cpu_count() or 1, ("-w", "--workers"),
            metavar="N", default_doc="the CPU count", help="Number of worker processes."),
    Setting("spare_workers", non_negative_int, 1, ("--spare-workers",), metavar="N",
            help="Workers kept booted per generation (app imported, not accepting) to take a "
                 "dead worker's place at once: the replacement accepts within milliseconds "
                 "instead of after a boot (~100 ms, more under load). 0: none."),
    Setting("worker_connections", positive_int, 1000, ("--worker-connections",), metavar="N",
            help="Concurrent calls per worker; a full worker leaves new calls queued for others."),
    Setting("max_calls", non_negative_int, 0, ("--max-calls",), metavar="N",
            help="Recycle a worker after N calls: it stops accepting, finishes its calls and is "
                 "replaced (0: never). Never cuts a call."),
    Setting("max_calls_jitter", non_negative_int, 0, ("--max-calls-jitter",), metavar="N",
            help="Add 0..N at random to each worker's --max-calls, so workers do not all "
                 "recycle at once."),
    Setting("backlog", positive_int, 2048, ("--backlog",), metavar="N",
            help="Listen backlog (capped by net.core.somaxconn); calls wait here during restarts."),
    Setting("timeout", non_negative_float, 30.0, ("--timeout",), metavar="SECONDS",
            help="A worker whose event loop misses heartbeats this long is killed and replaced."),
    Setting("graceful_timeout", non_negative_float, 3600.0, ("--graceful-timeout",),
            metavar="SECONDS",
            help="How long a stopping worker keeps its in-flight calls before closing them."),
    Setting("command_timeout", non_negative_float, 30.0, ("--command-timeout",),
            metavar="SECONDS",
            help="Default wait for a command's reply; a late reply closes that call, never "
                 "desynchronises it."),
    Setting("wait_timeout", non_negative_float, 3600.0, ("--wait-timeout",), metavar="SECONDS",
            help="Default wait for an execute to complete, an event (wait_for) or a bgapi job; "
                 "the call goes on after a WaitTimeout."),
    Setting("linger", positive_int, 10, ("--linger",), metavar="SECONDS",
            help="Linger time sent on every `full` socket before the handler runs, so "
                 "CHANNEL_HANGUP_COMPLETE arrives (a bare `linger` would pin the call inside "
                 "FreeSWITCH for ever)."),
    Setting("on_handler_error", call_action, CallAction("hangup", "TEMPORARY_FAILURE"),
            ("--on-handler-error",), metavar="ACTION",
            help="What a call gets when its handler raises: `hangup:CAUSE` hangs it up (the "
                 "caller hears the failure at once, CDRs show CAUSE, an unanswered call gets "
                 "SIP 503 for TEMPORARY_FAILURE, so a carrier can route it elsewhere); "
                 "`dialplan` closes the socket and FreeSWITCH runs the dialplan's next action "
                 "(a fallback after `socket`, or NORMAL_CLEARING if there is none); "
                 "`transfer:EXTENSION[:DIALPLAN:CONTEXT]` sends it to another extension."),
    Setting("call_survival", on_off, True, ("--call-survival",), metavar="on|off",
            default_doc="`on`",
            help="Each worker passes the master a copy of every call's socket, so a call "
                 "survives its worker's death: a live worker takes it over (see --resume, "
                 "--orphan-action). Off: a worker's death ends its calls."),
    Setting("resume", optional_text, None, ("--resume",), metavar="MODULE:CALLABLE",
            help="Called as resume(session) for a call whose worker died (or whose generation "
                 "had to close) once a live worker has taken it over: session.resumed is True, "
                 "session.channel is FreeSWITCH's fresh CHANNEL_DATA. Without it, such a call "
                 "gets --orphan-action."),
    Setting("orphan_action", call_action, CallAction("hangup", "TEMPORARY_FAILURE"),
            ("--orphan-action",), metavar="ACTION",
            help="What a call whose worker died gets when there is no --resume hook: "
                 "`hangup[:CAUSE]`, `dialplan` or `transfer:EXTENSION[:DIALPLAN:CONTEXT]`, "
                 "carried out by the live worker that took the call over: never dead air, "
                 "never a channel left parked."),
    Setting("ready_timeout", non_negative_float, 60.0, ("--ready-timeout",), metavar="SECONDS",
            help="How long a reload or upgrade waits for its new workers to be ready; then it "
                 "is abandoned and the old generation keeps serving."),
    Setting("max_generations", positive_int, 4, ("--max-generations",), metavar="N",
            help="Generations of workers that may run at once (the serving one and those "
                 "draining after reloads); beyond it the oldest is closed, its calls cut."),
    Setting("stats", str, "127.0.0.1:9091", ("--stats",), metavar="HOST:PORT",
            help="Where the master serves /stats (JSON), /metrics (Prometheus) and /healthz; "
                 "`none` disables it. Keep it on loopback, or set a token."),
    Setting("stats_token", optional_text, None, ("--stats-token",), metavar="TOKEN",
            help="Bearer token the stats endpoint requires (`Authorization: Bearer TOKEN`, 401 "
                 "without it); a command line is visible to every local user, so prefer "
                 "--stats-token-file."),
    Setting("stats_token_file", optional_text, None, ("--stats-token-file",), metavar="FILE",
            help="File holding the stats bearer token (read at start and on reload, "
                 "surrounding whitespace ignored); wins over --stats-token."),
    Setting("health_queue_limit", positive_int, 100, ("--health-queue-limit",), metavar="N",
            help="/healthz answers 503 when an accept queue holds this many calls (or no "
                 "worker is ready)."),
    Setting("pidfile", str, None, ("-p", "--pidfile"), metavar="FILE",
            help="Write the master's PID here (for `esl-gateway reload|upgrade -p FILE`)."),
    Setting("allow", network_list, lambda: list(DEFAULT_ALLOW), ("--allow",),
            metavar="CIDR[,CIDR...]",
            help="Peers that may connect (FreeSWITCH's addresses): any other is closed before "
                 "a byte is sent, counted and logged (rate-limited). Default: loopback and the "
                 "private ranges; a public address must be listed. IPv4-mapped IPv6 peers are "
                 "matched as IPv4."),
    Setting("handshake_timeout", non_negative_float, 10.0, ("--handshake-timeout",),
            metavar="SECONDS",
            help="How long a new connection may take to answer `connect` with its channel "
                 "data; a silent peer (port scanner, health check) is closed after it, counted "
                 "and logged (rate-limited)."),
    Setting("max_handshakes", positive_int, 4096, ("--max-handshakes",), metavar="N",
            help="Connections per worker that may wait for their channel data at once after "
                 "their first 0.1 s; until then a connection holds a --worker-connections slot, "
                 "after it only one of these, so silent peers cost memory, not call slots."),
    Setting("max_frame_size", positive_int, protocol.DEFAULT_MAX_FRAME_SIZE, ("--max-frame-size",),
            metavar="BYTES", help="Largest frame accepted from FreeSWITCH; a larger one closes "
                                  "that call as a protocol error."),
    Setting("max_header_block", positive_int, protocol.DEFAULT_MAX_HEADER_BLOCK,
            ("--max-header-block",), metavar="BYTES",
            help="Largest header block (a frame's, or a plain event's own) accepted from "
                 "FreeSWITCH; a larger one closes that call as a protocol error."),
    Setting("max_headers", positive_int, protocol.DEFAULT_MAX_HEADERS, ("--max-headers",),
            metavar="N",
            help="Most header lines in one header block from FreeSWITCH (a call's channel "
                 "data has a few hundred); more closes that call as a protocol error."),
    Setting("max_line_length", positive_int, protocol.DEFAULT_MAX_LINE_LENGTH,
            ("--max-line-length",), metavar="BYTES",
            help="Longest header line accepted from FreeSWITCH; a longer one closes that call "
                 "as a protocol error."),
    Setting("frame_timeout", non_negative_float, 10.0, ("--frame-timeout",), metavar="SECONDS",
            help="A frame FreeSWITCH has begun must be complete within this time: a peer "
                 "trickling bytes is closed as a protocol error (0: no deadline)."),
    Setting("max_queued_events", positive_int, 5000, ("--max-queued-events",), metavar="N",
            help="Events a call may hold unread by its handler; overflow ends that call, logged."),
    Setting("user", optional_text, None, ("--user",), metavar="USER",
            help="Started as root: once the sockets are bound and the pidfile written, the "
                 "master switches to this user (name or uid) before it forks any worker."),
    Setting("group", optional_text, None, ("--group",), metavar="GROUP",
            help="The group to switch to with --user (default: the user's own group)."),
    Setting("log_level", log_level, "INFO", ("--log-level",), metavar="LEVEL",
            help="debug, info, warning, error or critical. Logs always go to stderr."),
)

BY_NAME = {setting.name: setting for setting in SETTINGS}


class ConfigError(Exception):
    """A setting has a value that cannot be used; the message names the setting and its source."""


class Config:
    """Resolved settings as attributes (``config.workers``), plus where each came from."""

    def __init__(self, values: dict[str, Any], sources: dict[str, str], path: str | None):
        self.__dict__.update(values)
        self.values = values
        self.sources = sources
        self.path = path

    def summary(self) -> dict[str, Any]:
        return dict(self.values)


def add_arguments(parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None) -> None:
    """Add every setting (or those ``names``) to an argparse parser; unset flags stay None so
    precedence works."""
    parser.add_argument("-c", "--config", metavar="FILE",
                        help=f"INI file with a [{FILE_SECTION}] section (re-read on reload).")
    for setting in SETTINGS if names is None else [BY_NAME[name] for name in names]:
        if not setting.flags:
            parser.add_argument(setting.name, nargs="?", metavar=setting.metavar,
                                help=setting.help)
            continue
        parser.add_argument(*setting.flags, dest=setting.name, metavar=setting.metavar,
                            action="append" if setting.repeatable else "store",
                            help=f"{setting.help} [env {setting.env}]")


def resolve(cli: dict[str, Any], environ: dict[str, str] | None = None,
            need_app: bool = True) -> Config:
    """Merge defaults, the config file, the environment and the command line, in that order.
    ``need_app``: false for the commands that talk to a running master (they need its pidfile
    and stats address, not what it serves)."""
    environ = os.environ if environ is None else environ
    path = cli.get("config") or environ.get(ENV_PREFIX + "CONFIG")
    file_values = _read_file(path) if path else {}
    values, sources = {}, {}
    for setting in SETTINGS:
        value, source = setting.default_value(), "default"
        if setting.file_key in file_values:
            value = _convert(setting, file_values.pop(setting.file_key), f"{path}")
            source = "file"
        if setting.env in environ:
            value = _convert(setting, environ[setting.env], setting.env)
            source = "env"
        given = cli.get(setting.name)
        if given is not None:
            if setting.repeatable:
                value = [item for text in given for item in _convert(setting, text, "command line")]
            else:
                value = _convert(setting, given, "command line")
            source = "command line"
        values[setting.name], sources[setting.name] = value, source
    if file_values:
        raise ConfigError(f"{path}: unknown setting(s) {', '.join(sorted(file_values))}")
    if not need_app:
        return Config(values, sources, path)
    if values["app"] and values["proxy"]:
        raise ConfigError("an app or --proxy, not both")
    if not values["app"] and not values["proxy"]:
        raise ConfigError("no app given: pass MODULE:CALLABLE (or --proxy HOST:PORT), set "
                          "app = in the config file, "
                          f"or {ENV_PREFIX}APP")
    return Config(values, sources, path)


def _read_file(path: str) -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle)
    except (OSError, configparser.Error) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    if not parser.has_section(FILE_SECTION):
        raise ConfigError(f"{path}: no [{FILE_SECTION}] section")
    return {key.replace("-", "_"): value for key, value in parser.items(FILE_SECTION)}


def _convert(setting: Setting, text: Any, source: str) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return setting.type(text)
    except ValueError as exc:
        raise ConfigError(f"{setting.name} from {source}: {exc}") from None


def settings_table() -> str:
    """The README's settings table, generated from SETTINGS (tests check the README matches)."""
    rows = ["| setting (file key) | CLI flag | environment | default | meaning |",
            "|---|---|---|---|---|"]
    for setting in SETTINGS:
        flags = ", ".join(f"`{flag}`" for flag in setting.flags) or "positional"
        default = setting.default_value()
        if isinstance(default, list):
            default = ", ".join(default)
        shown = setting.default_doc or ("—" if default is None else f"`{default}`")
        rows.append(f"| `{setting.file_key}` | {flags} | `{setting.env}` | {shown} | "
                    f"{setting.help} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_table())
