"""Human-readable views of the master's /stats, for ``esl-gateway stats`` and ``esl-gateway top``.

Everything the seed's operators had to dig out with ``ps -o etime``, ``systemctl`` restart
counters, ``nstat`` and a log file, on one screen.
"""

from __future__ import annotations

import json
import time
import urllib.request

COLUMNS = (("SLOT", "slot"), ("PID", "pid"), ("GEN", "generation"), ("STATE", "state"),
           ("UP", "uptime_s"), ("CALLS", "calls_active"), ("TOTAL", "calls_total"),
           ("DONE", "calls_completed"), ("FAILED", "calls_failed"), ("EXC", "handler_exceptions"),
           ("PERR", "protocol_errors"), ("EVENTS", "events"), ("CMDS", "commands"),
           ("HB", "heartbeat_age_s"), ("BLOCK", "longest_block_ms"), ("RSS", "rss_bytes"))


def fetch(address: str, token: str | None = None, timeout: float = 5.0) -> dict:
    request = urllib.request.Request(f"http://{address}/stats")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def megabytes(value) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}M"


def _cell(key: str, value) -> str:
    if key == "slot" and value == 0:
        return "spare"
    if key == "uptime_s":
        return duration(value)
    if key == "heartbeat_age_s":
        return f"{value:.1f}s"
    if key == "longest_block_ms":
        return f"{value}ms"
    if key == "rss_bytes":
        return megabytes(value)
    return str(value)


def render(view: dict, rate: float | None = None) -> str:
    """The whole screen: master, health, listeners, totals, one row per worker, recent exits."""
    master, totals = view["master"], view["totals"]
    lines = [
        f"esl-gateway {master['version']}  master {master['pid']}  up "
        f"{duration(master['uptime_s'])}  generation {master['generation']}"
        + (f" (starting {master['starting_generation']})" if master["starting_generation"]
           else "")
        + f"  reloads {master['reloads']} ({master['reload_failures']} failed)"
        f"  upgrades {master['upgrades']} ({master['upgrade_failures']} failed)",
        f"health: {'ok' if view['health']['ok'] else 'FAILING'} ({view['health']['reason']})",
    ]
    for sock in view["listeners"]:
        lines.append(f"listener {sock['address']}"
                     + ("" if sock["listening"] else "  NOT LISTENING (drained: refuses connects)")
                     + f"  accept queue {sock['queue']}/"
                     f"{sock['queue_limit']}  listen overflows {view['listen_overflows']}  "
                     f"drops {view['listen_drops']} (since start, whole namespace)")
    lines.append(f"calls: {totals['calls_active']} active, {totals['calls']} total, "
                 f"{totals['failed']} failed, {totals['handler_exceptions']} handler exceptions, "
                 f"{totals['protocol_errors']} protocol errors"
                 + ("" if rate is None else f"  |  {rate:.1f} calls/s"))
    per_death = totals["calls_per_death"]
    lines.append(f"worker deaths: {totals['worker_deaths']} total, "
                 f"{totals['worker_deaths_per_minute']} in the last minute, "
                 f"{'-' if per_death is None else per_death} calls completed per death; "
                 f"{totals['calls_lost']} calls lost with their workers")
    lines.append(f"orphaned calls: {totals['calls_orphaned']} handed to live workers "
                 f"({totals['resumed']} resumed by the hook, {totals['resumed_fallback']} given "
                 f"--orphan-action, {totals['resumed_gone']} had ended, "
                 f"{totals['resumed_failed']} failed), {totals['calls_orphaned_now']} waiting "
                 f"now; {totals['calls_held']} call sockets held by the master")
    for slot in view["slots"]:
        if slot["crash_loop"] or slot["deaths_per_minute"]:
            line = (f"  slot {slot['slot']} gen {slot['generation']}: {slot['state']}, "
                    f"{slot['deaths_per_minute']} deaths in the last minute, "
                    f"{'-' if slot['calls_per_death'] is None else slot['calls_per_death']} "
                    "calls per death")
            if slot["crash_loop"]:
                line += (f"; CRASH LOOP: {slot['unserved_in_a_row']} workers in a row ended "
                         f"before serving ({slot['crash_loop']})")
            if slot["next_attempt_in_s"] is not None:
                line += f"; next attempt in {slot['next_attempt_in_s']:.1f}s"
            lines.append(line)
    if master["last_deploy_error"]:
        error = master["last_deploy_error"]
        when = time.strftime("%H:%M:%S", time.localtime(error["time"]))
        lines.append(f"last failed {error['kind']} at {when}: {error['reason']}")
    rows = [[title for title, _ in COLUMNS]]
    rows += [[_cell(key, worker[key]) for _, key in COLUMNS] for worker in view["workers"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines.append("")
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
              for row in rows]
    exits = view["exits"][:8]
    if exits:
        causes = ", ".join(f"{cause} {count}" for cause, count in
                           sorted(view["worker_exits"].items()))
        lines += ["", f"recent worker exits (all time: {causes}):"]
        for exit in exits:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(exit["time"]))
            last = f"  | {exit['traceback'][-1]}" if exit["traceback"] else ""
            lines.append(f"  {when}  slot {exit['slot']} pid {exit['pid']} gen "
                         f"{exit['generation']}  {exit['classification']:<14} {exit['detail']} "
                         f"after {duration(exit['uptime'])}{last}")
    return "\n".join(lines)


def top(fetch_view, interval: float, count: int | None, out) -> None:
    """Refresh the screen every ``interval`` seconds with call rates (like uwsgitop);
    ``fetch_view()`` returns the master's /stats."""
    previous = None
    shown = 0
    while count is None or shown < count:
        view = fetch_view()
        rate = None
        if previous is not None:
            elapsed = view["master"]["uptime_s"] - previous["master"]["uptime_s"]
            if elapsed > 0:
                rate = (view["totals"]["calls"] - previous["totals"]["calls"]) / elapsed
        out.write("\x1b[H\x1b[2J" + render(view, rate) + "\n")
        out.flush()
        previous, shown = view, shown + 1
        if count is None or shown < count:
            time.sleep(interval)
