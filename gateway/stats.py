"""The master's view of the world: what ``/stats``, ``/metrics`` and ``/healthz`` serve.

Everything here is read from memory the master already keeps (worker heartbeats, exits, deploy
counters) plus a few cheap kernel reads: TCP_INFO on each listening socket (the accept queue, as
``ss -lnt`` shows it), ``/proc/net/netstat`` (ListenOverflows/ListenDrops) and each worker's RSS.
Totals add the last counters of every dead worker, so they only ever grow.
"""

from __future__ import annotations

import os
import socket
import struct
import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from gateway import __version__, listeners

# struct tcp_info: 8 one-byte fields, then u32 rto, ato, snd_mss, rcv_mss, unacked, sacked. On a
# listening socket unacked is the accept queue's length and sacked its limit.
TCP_INFO = struct.Struct("8xIIIIII")
TRACEBACK_LINES = 12
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# (heartbeat counter, metric name, help)
COUNTERS = (("calls", "calls", "calls accepted"),
            ("failed", "calls_failed", "calls that failed (setup or handler)"),
            ("handler_exceptions", "handler_exceptions", "exceptions raised by the handler"),
            ("protocol_errors", "protocol_errors",
             "calls closed for malformed frames from FreeSWITCH"),
            ("events", "events", "events received from FreeSWITCH"),
            ("commands", "commands", "commands sent"),
            ("accept_errors", "accept_errors", "accept() failures (EMFILE and the like)"))


def accept_queue(sock: socket.socket) -> tuple[int, int]:
    """(connections waiting to be accepted, the queue's limit) for a listening TCP socket."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO.size)
    _, _, _, _, queued, limit = TCP_INFO.unpack_from(info)
    return queued, limit


def listen_counters() -> dict[str, int]:
    """ListenOverflows and ListenDrops of this network namespace (not per socket)."""
    try:
        with open("/proc/net/netstat") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return {}
    for names, values in zip(lines, lines[1:]):
        if names.startswith("TcpExt:") and values.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], map(int, values.split()[1:])))
            return {key: table.get(key, 0) for key in ("ListenOverflows", "ListenDrops")}
    return {}


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return None   # it just exited


def snapshot(master) -> dict:
    """The whole picture as plain data (the /stats JSON)."""
    now, wall = time.monotonic(), time.time()
    overflows = listen_counters()
    socks = []
    for sock in master.listeners:
        queued, limit = accept_queue(sock)
        socks.append({"address": listeners.describe(sock), "queue": queued,
                      "queue_limit": limit})
    workers = []
    for record in sorted(master.workers.values(), key=lambda w: (w.generation, w.slot)):
        counters = record.counters
        workers.append({
            "slot": record.slot, "pid": record.pid, "generation": record.generation,
            "state": record.state, "uptime_s": round(now - record.started, 3),
            "calls_active": counters.get("active", 0),
            "calls_total": counters.get("calls", 0), "calls_failed": counters.get("failed", 0),
            "handler_exceptions": counters.get("handler_exceptions", 0),
            "protocol_errors": counters.get("protocol_errors", 0),
            "events": counters.get("events", 0), "commands": counters.get("commands", 0),
            "accept_errors": counters.get("accept_errors", 0),
            "heartbeat_age_s": round(now - record.last_heartbeat, 3),
            "longest_block_ms": counters.get("longest_block_ms", 0),
            "rss_bytes": rss_bytes(record.pid)})
    totals = {key: master.dead_totals.get(key, 0) + sum(w.counters.get(key, 0)
                                                        for w in master.workers.values())
              for key, _, _ in COUNTERS}
    totals["calls_active"] = sum(w["calls_active"] for w in workers)
    config = master.config
    view = {
        "master": {
            "pid": os.getpid(), "version": __version__, "started": master.started_at,
            "uptime_s": round(wall - master.started_at, 3), "generation": master.generation,
            "starting_generation": master.pending.generation if master.pending else None,
            "reloads": master.reloads, "reload_failures": master.reload_failures,
            "upgrades": master.upgrades, "upgrade_failures": master.upgrade_failures,
            "last_deploy_error": master.last_deploy_error,
            "config": {"app": config.app, "workers": config.workers,
                       "worker_connections": config.worker_connections,
                       "timeout": config.timeout, "graceful_timeout": config.graceful_timeout,
                       "max_calls": config.max_calls, "linger": config.linger}},
        "listeners": socks,
        "listen_overflows": overflows.get("ListenOverflows", 0)
        - master.listen_baseline.get("ListenOverflows", 0),
        "listen_drops": overflows.get("ListenDrops", 0)
        - master.listen_baseline.get("ListenDrops", 0),
        "workers": workers,
        "totals": totals,
        "worker_exits": dict(master.exit_counts),
        "exits": [dict(exit, traceback=_last_lines(exit.get("traceback")))
                  for exit in reversed(master.exits)],
    }
    view["health"] = health(view, config.health_queue_limit)
    return view


def health(view: dict, queue_limit: int) -> dict:
    """Healthy while a serving worker is ready and no accept queue is backing up."""
    ready = [w for w in view["workers"]
             if w["generation"] == view["master"]["generation"] and w["state"] == "ready"]
    backed_up = [s["address"] for s in view["listeners"] if s["queue"] >= queue_limit]
    if not ready:
        return {"ok": False, "reason": "no worker is ready to accept calls"}
    if backed_up:
        return {"ok": False, "reason": f"accept queue of {', '.join(backed_up)} at or above "
                                       f"{queue_limit}"}
    return {"ok": True, "reason": f"{len(ready)} worker(s) ready"}


def _last_lines(text: str | None) -> list[str]:
    return text.rstrip().splitlines()[-TRACEBACK_LINES:] if text else []


class _SnapshotCollector:
    """Turns one snapshot into Prometheus metric families (prometheus_client renders them)."""

    def __init__(self, view: dict):
        self.view = view

    def collect(self):
        view, master = self.view, self.view["master"]
        info = GaugeMetricFamily("esl_gateway_info", "esl-gateway version", labels=["version"])
        info.add_metric([master["version"]], 1)
        yield info
        yield GaugeMetricFamily("esl_gateway_start_time_seconds",
                                "when the master started (Unix time)", value=master["started"])
        yield GaugeMetricFamily("esl_gateway_generation", "serving worker generation",
                                value=master["generation"])
        for key, what in (("reloads", "completed reloads"), ("reload_failures",
                                                               "abandoned reloads"),
                          ("upgrades", "in-place master upgrades"),
                          ("upgrade_failures", "upgrades rolled back")):
            yield CounterMetricFamily(f"esl_gateway_{key}", what, value=master[key])
        yield GaugeMetricFamily("esl_gateway_healthy", "1 while /healthz answers 200",
                                value=int(view["health"]["ok"]))
        queue = GaugeMetricFamily("esl_gateway_listen_queue",
                                  "connections waiting in the accept queue", labels=["listener"])
        limit = GaugeMetricFamily("esl_gateway_listen_queue_limit", "accept queue limit",
                                  labels=["listener"])
        for sock in view["listeners"]:
            queue.add_metric([sock["address"]], sock["queue"])
            limit.add_metric([sock["address"]], sock["queue_limit"])
        yield queue
        yield limit
        yield CounterMetricFamily("esl_gateway_listen_overflows",
                                  "SYNs dropped on a full accept queue since the master started "
                                  "(whole network namespace)", value=view["listen_overflows"])
        yield CounterMetricFamily("esl_gateway_listen_drops",
                                  "connections dropped while listening since the master started "
                                  "(whole network namespace)", value=view["listen_drops"])
        for key, name, what in COUNTERS:
            yield CounterMetricFamily(f"esl_gateway_{name}", f"{what}, all workers ever",
                                      value=view["totals"][key])
        yield GaugeMetricFamily("esl_gateway_calls_active", "calls in progress",
                                value=view["totals"]["calls_active"])
        exits = CounterMetricFamily("esl_gateway_worker_exits", "worker exits by cause",
                                    labels=["classification"])
        for classification, count in sorted(view["worker_exits"].items()):
            exits.add_metric([classification], count)
        yield exits
        labels = ["slot", "pid", "generation", "state"]
        per_worker = {
            "calls_active": GaugeMetricFamily("esl_gateway_worker_calls_active",
                                              "calls in progress", labels=labels),
            "calls_total": CounterMetricFamily("esl_gateway_worker_calls", "calls accepted",
                                               labels=labels),
            "uptime_s": GaugeMetricFamily("esl_gateway_worker_uptime_seconds",
                                          "seconds since the worker started", labels=labels),
            "heartbeat_age_s": GaugeMetricFamily("esl_gateway_worker_heartbeat_age_seconds",
                                                 "seconds since its last message", labels=labels),
            "longest_block_ms": GaugeMetricFamily("esl_gateway_worker_longest_block_milliseconds",
                                                  "longest event-loop block seen",
                                                  labels=labels),
            "rss_bytes": GaugeMetricFamily("esl_gateway_worker_rss_bytes", "resident memory",
                                           labels=labels),
        }
        for worker in view["workers"]:
            values = [str(worker[label]) for label in labels]
            for key, family in per_worker.items():
                if worker[key] is not None:
                    family.add_metric(values, worker[key])
        yield from per_worker.values()


def render_metrics(view: dict) -> bytes:
    """The Prometheus text exposition format, rendered by prometheus_client itself."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(view))
    return generate_latest(registry)
