"""The master's view of the world: what ``/stats``, ``/metrics`` and ``/healthz`` serve.

Everything here is read from memory the master already keeps (the workers' shared counters,
exits, slot histories, deploy counters) plus a few cheap kernel reads: TCP_INFO on each listening
socket (the accept queue, as ``ss -lnt`` shows it), ``/proc/net/netstat``
(ListenOverflows/ListenDrops) and each worker's RSS. Totals add the final counters of every dead
worker, so they only ever grow.
"""

from __future__ import annotations

import os
import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from gateway import __version__, listeners
from gateway.ipc import BACKEND_COUNTERS
from gateway.backoff import per_death

TRACEBACK_LINES = 12
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# (heartbeat counter, metric name, help)
COUNTERS = (("calls", "calls", "calls accepted"),
            ("completed", "calls_completed",
             "calls completed (the handler returned, or the caller hung up under it)"),
            ("failed", "calls_failed", "calls that failed (setup or handler)"),
            ("handler_exceptions", "handler_exceptions", "exceptions raised by the handler"),
            ("protocol_errors", "protocol_errors",
             "calls closed for malformed frames from FreeSWITCH"),
            ("events", "events", "events received from FreeSWITCH"),
            ("commands", "commands", "commands sent"),
            ("accept_errors", "accept_errors", "accept() failures (EMFILE and the like)"),
            ("unprotected", "calls_unprotected",
             "calls whose socket could not be passed to the master (they die with their worker)"),
            ("resumed", "calls_resumed",
             "orphaned calls a live worker took over and gave to the --resume hook"),
            ("resumed_fallback", "calls_resumed_fallback",
             "orphaned calls a live worker took over and ended with --orphan-action"),
            ("resumed_gone", "calls_resumed_gone",
             "orphaned calls whose FreeSWITCH side had ended before a worker took them over"),
            ("resumed_failed", "calls_resumed_failed",
             "orphaned calls a live worker failed to take over"),
            ("peers_refused", "peers_refused",
             "connections from peers outside --allow, closed before a byte was sent"),
            ("handshake_timeouts", "handshake_timeouts",
             "connections closed for not answering connect within --handshake-timeout"))


# (totals key and metric name, metric type, help): figures the master itself keeps.
TOTALS = (("calls_active", GaugeMetricFamily, "calls in progress"),
          ("calls_lost", CounterMetricFamily,
           "calls a worker's death ended: not protected, or not resumed"),
          ("calls_orphaned", CounterMetricFamily,
           "calls in progress on a worker that died or closed, handed to live workers"),
          ("calls_orphaned_now", GaugeMetricFamily, "orphaned calls waiting for a live worker"),
          ("calls_held", GaugeMetricFamily, "call sockets the master holds a copy of"),
          ("worker_deaths", CounterMetricFamily,
           "worker exits that were not planned (crashes, the app's own exits, kills, hangs, "
           "boot errors)"),
          ("worker_deaths_per_minute", GaugeMetricFamily, "worker deaths in the last 60 s"))


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


def oom_kills() -> int | None:
    """How many processes the kernel's OOM killer has killed since boot (None if unknown)."""
    try:
        with open("/proc/vmstat") as handle:
            for line in handle:
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


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
        queued, limit = listeners.accept_queue(sock)
        socks.append({"address": listeners.describe(sock), "queue": queued,
                      "queue_limit": limit, "listening": listeners.is_listening(sock)})
    workers, live = [], {}
    for record in sorted(master.workers.values(), key=lambda w: (w.generation, w.slot)):
        counters = live[record.pid] = record.counters
        workers.append({
            "slot": record.slot, "pid": record.pid, "generation": record.generation,
            "state": record.state, "uptime_s": round(now - record.started, 3),
            "calls_active": counters["active"], "calls_total": counters["calls"],
            "calls_completed": counters["completed"], "calls_failed": counters["failed"],
            "served": bool(counters["served"]),
            "handler_exceptions": counters["handler_exceptions"],
            "protocol_errors": counters["protocol_errors"],
            "events": counters["events"], "commands": counters["commands"],
            "accept_errors": counters["accept_errors"],
            "heartbeat_age_s": round(now - record.last_heartbeat, 3),
            "longest_block_ms": counters["longest_block_ms"],
            "rss_bytes": rss_bytes(record.pid)})
    totals = {key: master.dead_totals[key] + sum(c[key] for c in live.values())
              for key, _, _ in COUNTERS}
    totals["calls_active"] = sum(w["calls_active"] for w in workers)
    # What workers' deaths did to the calls in progress on them.
    totals["calls_orphaned"] = master.calls_orphaned
    totals["calls_orphaned_now"] = len(master.orphans)
    totals["calls_held"] = sum(len(w.held) for w in master.workers.values())
    totals["calls_lost"] = master.calls_lost + totals["resumed_failed"]
    backoff = master.backoff
    totals["worker_deaths"] = backoff.deaths_total
    totals["worker_deaths_per_minute"] = backoff.deaths_per_minute(now)
    totals["calls_per_death"] = per_death(totals["completed"], backoff.deaths_total)
    config = master.config
    view = {
        "master": {
            "pid": os.getpid(), "version": __version__, "started": master.started_at,
            "uptime_s": round(wall - master.started_at, 3), "generation": master.generation,
            "starting_generation": master.pending.generation if master.pending else None,
            "drain": None if master.drain is None else {
                "state": master.drain.state, "since_s": round(now - master.drain.since, 3)},
            "reloads": master.reloads, "reload_failures": master.reload_failures,
            "upgrades": master.upgrades, "upgrade_failures": master.upgrade_failures,
            "last_deploy_error": master.last_deploy_error,
            "config": {"app": config.app, "workers": config.workers,
                       "spare_workers": config.spare_workers,
                       "worker_connections": config.worker_connections,
                       "timeout": config.timeout, "graceful_timeout": config.graceful_timeout,
                       "max_calls": config.max_calls, "linger": config.linger}},
        "listeners": socks,
        "listen_overflows": overflows.get("ListenOverflows", 0)
        - master.listen_baseline.get("ListenOverflows", 0),
        "listen_drops": overflows.get("ListenDrops", 0)
        - master.listen_baseline.get("ListenDrops", 0),
        "workers": workers,
        "slots": slots(master, live, now),
        "proxy": proxy_view(master),
        "totals": totals,
        "worker_exits": dict(master.exit_counts),
        "exits": [dict(exit, traceback=_last_lines(exit.get("traceback")))
                  for exit in reversed(master.exits)],
    }
    view["health"] = health(view, config.health_queue_limit)
    return view


def proxy_view(master) -> dict | None:
    """Proxy mode: each backend's figures (all workers, dead ones included), the calls waiting
    for one now, and the recent relays (which backend served which FreeSWITCH peer)."""
    config = master.config
    if not config.proxy:
        return None
    backends = {address: dict(master.dead_backends.get(address, {})) for address in
                config.proxy}
    waiting, gave_up, recent = 0, master.dead_gave_up, []
    for record in master.workers.values():
        report = record.proxy or {}
        waiting += report.get("waiting", 0)
        gave_up += report.get("gave_up", 0)
        recent += report.get("recent", [])
        for address, figures in report.get("backends", {}).items():
            into = backends.setdefault(address, {})
            for key in BACKEND_COUNTERS:
                into[key] = into.get(key, 0) + figures.get(key, 0)
            for key in ("answered_ago", "failed_ago"):   # the most recent, over workers
                ago, seen = figures.get(key), into.get(key)
                if ago is not None:
                    into[key] = ago if seen is None else min(ago, seen)
    for figures in backends.values():
        for key in BACKEND_COUNTERS:
            figures.setdefault(key, 0)
    return {"backends": backends, "waiting": waiting, "gave_up": gave_up,
            "recent": recent[-50:], "backend_wait": config.backend_wait}


def slots(master, live: dict, now: float) -> list[dict]:
    """Each worker slot of the serving and the starting generation: who serves it, its crash
    rate, and if it is in a crash loop, why and when it is tried again."""
    generations = [master.generation] + ([master.pending.generation] if master.pending else [])
    configs = [master.config] + ([master.pending.config] if master.pending else [])
    view = []
    for generation, config in zip(generations, configs):
        for slot in range(1, config.workers + 1):
            key = (generation, slot)
            worker = next((w for w in master.workers.values() if (w.generation, w.slot) == key
                           and w.state != "draining"), None)
            history = master.backoff.slots.get(key)
            completed = (history.completed_by_dead if history else 0) + (
                live[worker.pid]["completed"] if worker else 0)
            deaths = history.deaths_total if history else 0
            wait = history.not_before - now if history and history.not_before > now else None
            state = worker.state if worker else "backoff" if wait is not None else "vacant"
            view.append({
                "generation": generation, "slot": slot, "pid": worker.pid if worker else None,
                "state": state, "deaths_total": deaths,
                "deaths_per_minute": master.backoff.deaths_per_minute(now, key) if history
                else 0,
                "calls_completed": completed, "calls_per_death": per_death(completed, deaths),
                "unserved_in_a_row": history.unserved_in_a_row if history else 0,
                "next_attempt_in_s": None if wait is None else round(wait, 3),
                "crash_loop": history.loop_reason if history else None})
    return view


def ready_workers(view: dict) -> list[dict]:
    """The serving generation's workers that accept calls."""
    return [w for w in view["workers"]
            if w["generation"] == view["master"]["generation"] and w["state"] == "ready"]


def health(view: dict, queue_limit: int) -> dict:
    """Healthy while a serving worker is ready and no accept queue is backing up, unless the
    host is drained: a load balancer or a monitor sees the drain from its first moment."""
    drain = view["master"]["drain"]
    if drain is not None:
        return {"ok": False, "reason": f"draining: {drain['state']} "
                                       f"({drain['since_s']:.0f}s since the drain)"}
    ready = ready_workers(view)
    backed_up = [s["address"] for s in view["listeners"] if s["queue"] >= queue_limit]
    if not ready:
        return {"ok": False, "reason": "no worker is ready to accept calls"}
    if backed_up:
        return {"ok": False, "reason": f"accept queue of {', '.join(backed_up)} at or above "
                                       f"{queue_limit}"}
    proxy = view["proxy"]
    if proxy is not None:
        window = proxy["backend_wait"]
        figures = proxy["backends"].values()
        answered = min((f["answered_ago"] for f in figures if f.get("answered_ago") is not None),
                       default=None)
        failed = min((f["failed_ago"] for f in figures if f.get("failed_ago") is not None),
                     default=None)
        # Failing since the last answer, and that answer (if any) is older than backend_wait.
        if failed is not None and (answered is None or failed < answered) and \
                (answered is None or answered > window):
            return {"ok": False, "reason": f"no backend has answered for {window:.0f}s"}
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
                          ("upgrade_failures", "upgrades rolled back or refused")):
            yield CounterMetricFamily(f"esl_gateway_{key}", what, value=master[key])
        yield GaugeMetricFamily("esl_gateway_healthy", "1 while /healthz answers 200",
                                value=int(view["health"]["ok"]))
        yield GaugeMetricFamily("esl_gateway_workers_ready",
                                "workers of the serving generation ready to accept calls",
                                value=len(ready_workers(view)))
        yield GaugeMetricFamily("esl_gateway_draining", "1 from a drain until the undrain "
                                "(new calls go to the dialplan's next host)",
                                value=int(master["drain"] is not None))
        listening = GaugeMetricFamily("esl_gateway_listening", "1 while the socket listens, 0 "
                                      "once a drain made it refuse connects",
                                      labels=["listener"])
        queue = GaugeMetricFamily("esl_gateway_listen_queue",
                                  "connections waiting in the accept queue", labels=["listener"])
        limit = GaugeMetricFamily("esl_gateway_listen_queue_limit", "accept queue limit",
                                  labels=["listener"])
        for sock in view["listeners"]:
            queue.add_metric([sock["address"]], sock["queue"])
            limit.add_metric([sock["address"]], sock["queue_limit"])
            listening.add_metric([sock["address"]], int(sock["listening"]))
        yield queue
        yield limit
        yield listening
        yield CounterMetricFamily("esl_gateway_listen_overflows",
                                  "SYNs dropped on a full accept queue since the master started "
                                  "(whole network namespace)", value=view["listen_overflows"])
        yield CounterMetricFamily("esl_gateway_listen_drops",
                                  "connections dropped while listening since the master started "
                                  "(whole network namespace)", value=view["listen_drops"])
        for key, name, what in COUNTERS:
            yield CounterMetricFamily(f"esl_gateway_{name}", f"{what}, all workers ever",
                                      value=view["totals"][key])
        totals = view["totals"]
        for key, family, what in TOTALS:
            yield family(f"esl_gateway_{key}", what, value=totals[key])
        if totals["calls_per_death"] is not None:
            yield GaugeMetricFamily("esl_gateway_calls_per_death",
                                    "calls completed per worker death, since the master started",
                                    value=totals["calls_per_death"])
        slot_labels = ["generation", "slot"]
        per_slot = {
            "deaths_per_minute": GaugeMetricFamily(
                "esl_gateway_slot_deaths_per_minute", "deaths of this slot's workers in the "
                "last 60 s", labels=slot_labels),
            "calls_per_death": GaugeMetricFamily(
                "esl_gateway_slot_calls_per_death", "calls this slot's workers completed per "
                "death", labels=slot_labels),
            "unserved_in_a_row": GaugeMetricFamily(
                "esl_gateway_slot_unserved_deaths", "workers in a row that died before serving "
                "a call (2 or more: a crash loop)", labels=slot_labels),
            "next_attempt_in_s": GaugeMetricFamily(
                "esl_gateway_slot_backoff_seconds", "seconds until a crash-looping slot is "
                "tried again", labels=slot_labels),
        }
        for slot in view["slots"]:
            values = [str(slot["generation"]), str(slot["slot"])]
            for key, family in per_slot.items():
                if slot[key] is not None:
                    family.add_metric(values, slot[key])
        yield from per_slot.values()
        if view["proxy"] is not None:
            yield from _backend_metrics(view["proxy"])
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


def _backend_metrics(proxy: dict):
    """Proxy mode: each backend's counters, the calls waiting for one, those given up on."""
    for key in BACKEND_COUNTERS:
        family = CounterMetricFamily(f"esl_gateway_backend_{key}",
                                     f"proxy mode: {key.replace('_', ' ')}, per backend",
                                     labels=["backend"])
        for address, figures in sorted(proxy["backends"].items()):
            family.add_metric([address], figures[key])
        yield family
    yield GaugeMetricFamily("esl_gateway_backend_waiting",
                            "proxy mode: calls waiting for a backend now", value=proxy["waiting"])
    yield CounterMetricFamily("esl_gateway_backend_gave_up",
                              "proxy mode: calls handed back to the dialplan, no backend "
                              "answered within --backend-wait", value=proxy["gave_up"])


def render_metrics(view: dict) -> bytes:
    """The Prometheus text exposition format, rendered by prometheus_client itself."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(view))
    return generate_latest(registry)
